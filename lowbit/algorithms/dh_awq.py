"""Dynamic Heuristic AWQ: AWQ whose nearest rounding is corrected row by row.

Each output channel's mean error b = μᵀ(W_r − W) (μ = E[x] of the input, in the scaled space)
is shrunk greedily: one weight at a time moves to its other neighbouring grid point, the one
whose move shrinks |b| most, until |b| stops shrinking or max_flip_percent · in_features weights
of the row have moved. Each weight moves at most once. Input channels whose activation magnitude
lies beyond the knee of its sorted curve (Kneedle) are outliers and never move: by default the
magnitude is |E[x]|; `knee_on="rms"` takes √E[x²]. The rounding is the same in AWQ's α search
and in the final codes.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from ..formats import Format, QParams, QuantizedTensor
from .awq import AWQ, InputStats


# -- pure math ------------------------------------------------------------------------------------
def knee_threshold(magnitude: torch.Tensor, tolerance: float = 0.0) -> float:
    """The value at the knee of the ascending sorted `magnitude` [in] (Kneedle), moved up the curve
    by tolerance · in places; channels above it are outliers. inf when the curve has no knee."""
    from kneed import KneeLocator

    y = np.sort(magnitude.detach().double().cpu().numpy())
    n = len(y)
    if n < 3 or not y[-1] > y[0]:
        return math.inf
    with warnings.catch_warnings():  # kneed warns when it finds no knee; that answer is handled below
        warnings.simplefilter("ignore")
        knee = KneeLocator(np.arange(n), y, curve="convex", direction="increasing").knee
    if knee is None:
        return math.inf
    return float(y[min(int(knee) + int(tolerance * n), n - 1)])


def flip_budget(in_features: int, max_flip_percent: float) -> int:
    """Flips allowed per row: max_flip_percent · in_features, at least one when the percent is > 0."""
    return 0 if max_flip_percent <= 0 else max(1, int(max_flip_percent * in_features))


def greedy_flips(b: torch.Tensor, impact: torch.Tensor, allowed: torch.Tensor, budget: int,
                 penalty: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The global greedy rule, all rows at once: each step every row takes the allowed flip that
    leaves b² (+ that flip's `penalty`) smallest if that is below b² now (ties: lowest column), else
    stops for good. Without a penalty this is seed 001's rule: the flip that shrinks |b| most.

    Shapes: b [out], impact [out, in] (change of b per flip), allowed [out, in] bool, penalty
    [out, in] (squared error a flip adds besides b's) -> flipped [out, in] bool (at most `budget`
    per row), b after [out].
    """
    b, allowed = b.clone(), allowed.clone()
    flipped = torch.zeros_like(allowed)
    active = torch.ones_like(b, dtype=torch.bool)
    for _ in range(budget):
        after = (b[:, None] + impact).square()
        if penalty is not None:
            after = after + penalty
        best, j = after.masked_fill(~allowed, math.inf).min(dim=1)
        active &= best < b.square()
        if not active.any():
            break
        rows, cols = active.nonzero().squeeze(1), j[active]
        b[rows] = b[rows] + impact[rows, cols]
        flipped[rows, cols] = True
        allowed[rows, cols] = False
    return flipped, b


def dh_round(W: torch.Tensor, W_q: torch.Tensor, qp: QParams, fmt: Format, mu: torch.Tensor,
             outliers: torch.Tensor, budget: int, var: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Heuristic rounding of codes W_q (nearest) for W.

    Shapes: W, W_q [out, in]; mu [in] (E[x] of the input W sees); outliers [in] bool; var [in]
    (Var[x]: a flip moving a weight by δ also adds δ²·Var[x] to the output's squared error, counted
    when given) -> codes [out, in].
    """
    W_r = fmt.dequantize(W_q, qp)
    b = (W_r - W) @ mu
    codes, delta, valid = fmt.neighbour_codes(W, W_q, qp)
    penalty = None if var is None else flip_variance(W_r - W, delta, var)
    flipped, b_after = greedy_flips(b, delta * mu[None, :], valid & ~outliers[None, :], budget, penalty)
    info = {"flips": int(flipped.sum()), "b_before": float(b.abs().mean()), "b_after": float(b_after.abs().mean())}
    return torch.where(flipped, codes, W_q), info


def flip_variance(E: torch.Tensor, delta: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Squared output error a flip adds through the inputs' spread: ((E + δ)² − E²) · Var[x] per weight
    (channels taken as uncorrelated about their means). Shapes: E = W_r − W, δ [out, in]; var [in]."""
    return ((E + delta).square() - E.square()) * var[None, :]


# -- the method ------------------------------------------------------------------------------------
class DHAWQ(AWQ):
    """AWQ (scales, clipping) with the heuristic rounding above, in the α search and the final codes."""

    name = "dh-awq"
    defaults = {**AWQ.defaults, "knee_tolerance": 0.0, "max_flip_percent": 0.01, "knee_on": "mean",
                "flip_cost": "mean"}

    def __init__(self, **options):
        super().__init__(**options)
        self.check_choice("knee_on", ("mean", "rms"))
        self.check_choice("flip_cost", ("mean", "mse"))

    def round(self, W: torch.Tensor, qt: QuantizedTensor, X: InputStats, name: str,
              stats: dict | None = None) -> QuantizedTensor:
        magnitude = X.mean.abs() if self.options["knee_on"] == "mean" else X.sq.sqrt()
        threshold = knee_threshold(magnitude, self.options["knee_tolerance"])
        outliers = magnitude > threshold
        budget = flip_budget(W.shape[1], self.options["max_flip_percent"])
        var = (X.sq - X.mean.square()).clamp_min(0) if self.options["flip_cost"] == "mse" else None
        W_q, info = dh_round(W, qt.W_q, qt.qparams, qt.format, X.mean, outliers, budget, var)
        if stats is not None:
            stats.update(knee=None if math.isinf(threshold) else threshold,
                         outlier_pct=100 * float(outliers.float().mean()), **info)
        return QuantizedTensor(W_q, qt.qparams, qt.format)
