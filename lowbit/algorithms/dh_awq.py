"""Dynamic Heuristic AWQ: AWQ whose nearest rounding is corrected row by row.

Each output channel's mean error b = μᵀ(W_r − W) (μ = E[x] of the input, in the scaled space)
is shrunk greedily by moving weights to their other neighbouring grid point, each at most once,
while |b| shrinks and at most max_flip_percent · in_features weights of the row have moved. As in
seed 001's code, the flips that move b towards 0 are taken cheapest first: weights nearest the
midpoint between their two grid points, whose flip adds the least squared error (`flip_order="gain"`:
the flip that shrinks |b| most first; `flip_cost="mse"`: stop where b² plus the squared error the
flips add through Var[x] is least). Input channels above the Kneedle knee of the first half of
the descending sorted activation magnitudes are outliers and never move: by default the magnitude
is |E[x]|; `knee_on="rms"` takes √E[x²]. The rounding is the same in AWQ's α search and in the
final codes.
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
    """Seed 001's outlier threshold for `magnitude` [in]: sorted descending, the Kneedle knee of the
    first half (where the few loud channels end and the bulk begins), moved tolerance · (in/2) places
    further down the curve (a positive tolerance marks more channels). Channels strictly above the value
    at the knee are outliers; inf (none) when that half is flat or has no knee."""
    from kneed import KneeLocator

    y = np.sort(magnitude.detach().double().cpu().numpy())[::-1]
    n = len(y)
    half = y[:n // 2]
    if len(half) < 3:  # too few channels for a curve: seed 001 falls back to the top 5%
        return float(y[int(0.05 * n)]) if n else math.inf
    if not half[0] > half[-1]:
        return math.inf
    with warnings.catch_warnings():  # kneed warns when it finds no knee; that answer is handled below
        warnings.simplefilter("ignore")
        knee = KneeLocator(np.arange(len(half)), half, curve="convex", direction="decreasing").knee
    if knee is None:
        return math.inf
    return float(half[min(max(int(knee) + int(tolerance * len(half)), 0), len(half) - 1)])


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


def cheapest_flips(b: torch.Tensor, impact: torch.Tensor, allowed: torch.Tensor, closeness: torch.Tensor,
                   budget: int, penalty: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Seed 001's code's greedy rule, all rows at once: of the allowed flips that move b towards 0,
    take them in order of `closeness` (the weight's distance from its grid point over the distance
    to the other one: the nearer the midpoint, the less squared error the flip adds), as many as leave
    b² (+ the taken flips' `penalty`) smallest, at most `budget` per row. Without a penalty that is
    "while |b| shrinks": every step moves b the same way, so |b| falls, then rises past 0.

    Shapes: b [out], impact [out, in] (change of b per flip), allowed [out, in] bool, closeness
    [out, in], penalty [out, in] (squared error a flip adds besides b's) -> flipped [out, in] bool,
    b after [out].
    """
    toward = allowed & (impact * b[:, None] < 0)
    order = closeness.masked_fill(~toward, -math.inf).argsort(dim=1, descending=True, stable=True)[:, :budget]
    usable = toward.gather(1, order)
    path = torch.cat([b[:, None], b[:, None] + (impact.gather(1, order) * usable).cumsum(dim=1)], dim=1)
    cost = path.square()
    if penalty is not None:
        cost[:, 1:] += (penalty.gather(1, order) * usable).cumsum(dim=1)
    take = cost.argmin(dim=1)  # the first minimum: no flip that changes nothing
    chosen = torch.arange(order.shape[1], device=b.device)[None, :] < take[:, None]
    flipped = torch.zeros_like(allowed).scatter_(1, order, chosen & usable)
    return flipped, path.gather(1, take[:, None]).squeeze(1)


def dh_round(W: torch.Tensor, W_q: torch.Tensor, qp: QParams, fmt: Format, mu: torch.Tensor,
             outliers: torch.Tensor, budget: int, var: torch.Tensor | None = None,
             order: str = "cost") -> tuple[torch.Tensor, dict]:
    """Heuristic rounding of codes W_q (nearest) for W: flips in seed 001's order (`order="cost"`:
    cheapest first, see cheapest_flips) or by gain (`"gain"`: the flip that shrinks |b| most first, see
    greedy_flips).

    Shapes: W, W_q [out, in]; mu [in] (E[x] of the input W sees); outliers [in] bool; var [in]
    (Var[x]: a flip moving a weight by δ also adds δ²·Var[x] to the output's squared error, counted
    when given) -> codes [out, in].
    """
    E = fmt.dequantize(W_q, qp) - W
    b = E @ mu
    codes, delta, valid = fmt.neighbour_codes(W, W_q, qp)
    allowed, impact = valid & ~outliers[None, :], delta * mu[None, :]
    penalty = None if var is None else flip_variance(E, delta, var)
    if order == "cost":
        closeness = E.abs() / delta.abs().clamp_min(torch.finfo(delta.dtype).tiny)
        flipped, b_after = cheapest_flips(b, impact, allowed, closeness, budget, penalty)
    else:
        flipped, b_after = greedy_flips(b, impact, allowed, budget, penalty)
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
                "flip_order": "cost", "flip_cost": "mean"}

    def __init__(self, **options):
        super().__init__(**options)
        self.check_choice("knee_on", ("mean", "rms"))
        self.check_choice("flip_order", ("cost", "gain"))
        self.check_choice("flip_cost", ("mean", "mse"))

    def round(self, W: torch.Tensor, qt: QuantizedTensor, X: InputStats, name: str,
              stats: dict | None = None) -> QuantizedTensor:
        magnitude = X.mean.abs() if self.options["knee_on"] == "mean" else X.sq.sqrt()
        threshold = knee_threshold(magnitude, self.options["knee_tolerance"])
        outliers = magnitude > threshold
        budget = flip_budget(W.shape[1], self.options["max_flip_percent"])
        var = (X.sq - X.mean.square()).clamp_min(0) if self.options["flip_cost"] == "mse" else None
        W_q, info = dh_round(W, qt.W_q, qt.qparams, qt.format, X.mean, outliers, budget, var,
                             self.options["flip_order"])
        if stats is not None:
            stats.update(knee=None if math.isinf(threshold) else threshold,
                         outlier_pct=100 * float(outliers.float().mean()), **info)
        return QuantizedTensor(W_q, qt.qparams, qt.format)
