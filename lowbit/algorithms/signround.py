"""Signed-gradient tuning of rounding and ranges on a block's output (SignRound, arXiv 2309.05516),
started from codes and ranges another method already chose.

Each tuned linear on an evenly spaced integer grid gets, besides its fixed float weights W:
  V [out, in]       a rounding offset in grid steps: code = round(W / scale + zero + V), kept within
                    the two grid points around W / scale + zero (AdaRound's space);
  a, b [out, groups] factors on each group's upper and lower range end (symmetric grids: a alone).
Started where they reproduce the given codes and grid exactly, they are moved by signed gradient
steps of a linearly decaying size on the block-output MSE, rounding passed straight through.

Pure tensor math: the block's forward pass and its calibration batches come in as a loss function.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..formats import QParams, QuantizedTensor
from ..formats.int import IntFormat

RANGE_BOUNDS = (0.5, 1.5)  # how far a range end may move from where the search left it
# Range factors move this much slower than rounding offsets: each step of a factor moves every weight
# of its group, and at the offsets' rate the block loss rose for the first third of the steps and ended
# above the start on 3 of SmolLM2's first 6 layers; at 0.2x it fell 13-34% on all 6 (100 steps, g64).
RANGE_LR = 0.2


def tunable(qt: QuantizedTensor) -> bool:
    """Whether `qt`'s grid is one this tuner can move: integer, evenly spaced, columns in order."""
    return isinstance(qt.format, IntFormat) and qt.g_idx is None


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward."""
    return x + (x.round() - x).detach()


class GridTuner:
    """The trainable rounding offsets and range factors of one linear.

    Shapes: W [out, in] (work space, float32); qt's codes [out, in], scale and zero [out, groups].
    Weights are held per group, [out, groups, group_len], so a group's scale broadcasts over it.
    """

    def __init__(self, W: torch.Tensor, qt: QuantizedTensor):
        f: IntFormat = qt.format
        self.format, self.shape = f, W.shape
        self.W = f.grouped(W.float())
        self.scale0 = qt.qparams.scale.float()
        self.zero0 = qt.qparams.zero.float()
        self.V = _offsets_reproducing(f.grouped(qt.W_q.float()), _position(self.W, self.scale0, self.zero0), f.qmax)
        self.V.requires_grad_(True)
        self.a = torch.ones_like(self.scale0, requires_grad=True)
        self.b = torch.ones_like(self.scale0, requires_grad=not f.sym)

    def parameters(self) -> list[torch.Tensor]:
        return [self.V, self.a] + ([] if self.format.sym else [self.b])

    def grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The moved grid: scale, zero [out, groups] (zero integer-valued, straight-through)."""
        f = self.format
        if f.sym:
            return self.scale0 * self.a, self.zero0
        lo = -self.zero0 * self.scale0 * self.b
        hi = (f.qmax - self.zero0) * self.scale0 * self.a
        scale = ((hi - lo) / f.qmax).clamp(min=1e-8)
        return scale, round_ste(-lo / scale).clamp(0, f.qmax)

    def weight(self) -> torch.Tensor:
        """W_r [out, in], differentiable in V, a, b."""
        scale, zero = self.grid()
        return _GridWeight.apply(self.W, self.V, scale, zero, self.format.qmax).reshape(self.shape)

    @torch.no_grad()
    def quantized(self) -> QuantizedTensor:
        """The current codes and grid as the format stores them."""
        scale, zero = self.grid()
        codes = _codes(self.W, self.V, scale, zero, self.format.qmax)[0].to(torch.uint8).reshape(self.shape)
        return QuantizedTensor(codes, QParams(self.format.stored_scale(scale), zero.clone()), self.format)

    @torch.no_grad()
    def clamp_(self) -> None:
        self.V.clamp_(-1, 1)
        self.a.clamp_(*RANGE_BOUNDS)
        self.b.clamp_(*RANGE_BOUNDS)


def _position(W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """q = W / scale + zero [out, groups, group_len]: each weight's place on the grid, in code units
    (scale, zero [out, groups])."""
    return W / scale[..., None] + zero[..., None]


def _codes(W: torch.Tensor, V: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
           qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes c = round(q + V), q = W / scale + zero, kept within q's two grid points and [0, qmax];
    and where c is that rounding itself, not a bound (there the rounding passes gradients).

    Shapes: W, V [out, groups, group_len]; scale, zero [out, groups] -> c (float), through (bool) as W.
    """
    q = _position(W, scale, zero)
    r = (q + V).round_()
    low = q.floor_()  # in place: q itself is needed no further
    c = torch.minimum(torch.maximum(r, low), low + 1).clamp_(0, qmax)
    return c, r == c


class _GridWeight(torch.autograd.Function):
    """W_r = (c − zero) · scale with `_codes`' c, the rounding passed straight through: one pass each
    way over [out, groups, group_len] (autograd over the same chain keeps ~10 such intermediates).

    Where c is its rounding, dc = dq + dV (q = W / scale + zero); where a bound holds it, dc = 0. So
    ∂W_r/∂V = scale·through, ∂W_r/∂scale = (c − zero) − through·W / scale, ∂W_r/∂zero = −scale·(1 − through).
    """

    @staticmethod
    def forward(ctx, W, V, scale, zero, qmax):
        ctx.save_for_backward(W, V, scale, zero)
        ctx.qmax = qmax
        c, _ = _codes(W, V, scale, zero, qmax)
        return c.sub_(zero[..., None]).mul_(scale[..., None])

    @staticmethod
    def backward(ctx, G):
        W, V, scale, zero = ctx.saved_tensors
        c, through = _codes(W, V, scale, zero, ctx.qmax)
        G_through = G * through
        g_V = G_through * scale[..., None]
        g_scale = (G * c.sub_(zero[..., None])).sum(-1) - (G_through * W).sum(-1) / scale
        g_zero = (G_through - G).sum(-1) * scale
        return None, g_V, g_scale, g_zero, None


def _offsets_reproducing(codes: torch.Tensor, q: torch.Tensor, qmax: int) -> torch.Tensor:
    """Offsets V [out, in] with round(q + V) = codes, for codes within one step of q's nearest: 0
    where a code is the nearest; a code on the other side of the midpoint gets q mirrored across it,
    as far into its bin as q was from it in the nearest one (a little in from a tie), so signed
    steps weigh both roundings alike."""
    nearest = q.round()
    d = q - nearest  # in [-0.5, 0.5]
    other = codes != nearest.clamp(0, qmax)
    return torch.where(other, codes - nearest - d.clamp(-0.45, 0.45) - d, torch.zeros_like(q))


def sign_descent(tuners: list[GridTuner], grads_at: Callable[[int, list[torch.Tensor]], list[torch.Tensor]],
                 steps: int, lr: float) -> None:
    """`steps` signed-gradient steps on every tuner's parameters, of size lr · (1 − t / steps) at
    step t (range factors: RANGE_LR times that). grads_at(t, params) is the loss gradient of step t."""
    params = [p for t in tuners for p in t.parameters()]
    rates = [lr * (RANGE_LR if p is not t.V else 1.0) for t in tuners for p in t.parameters()]
    for t in range(steps):
        grads = grads_at(t, params)
        decay = 1 - t / steps
        with torch.no_grad():
            for p, g, rate in zip(params, grads, rates):
                p.sub_(g.sign(), alpha=rate * decay)
        for tu in tuners:
            tu.clamp_()
