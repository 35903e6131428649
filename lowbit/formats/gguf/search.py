"""Vectorised forms of llama.cpp's block-scale searches (ggml-quants.c).

Each function takes many blocks at once, x [B, n] float32 (one block per row), and does for every
block exactly what the C function does for one: same float32 operations in the same order, sums
accumulated left to right (`seqsum`), ties rounded half-to-even like `nearest_int`. That is what
makes the GGUF encoders reproduce llama.cpp's bytes; keep it that way when editing. Internally
the blocks are laid out element-major, [n, B], so the left-to-right sums add contiguous rows.

  make_qx_quants   symmetric scale search, signed codes          (Q6_K, Q3_K/Q4_0/Q5_0 with imatrix)
  make_q3_quants   symmetric, coordinate descent on the codes    (Q3_K)
  make_qkx2_quants scale + min search, fixed candidate grid       (Q2_K, Q4_K, Q5_K)
  make_qkx3_quants scale + min search, importance weighted        (imatrix Q2_K/Q4_K/Q5_K/Q4_1/Q5_1)
  make_qp_quants   unsigned quantization of a block's sub-scales  (imatrix K-quants)

Codes are returned as integer-valued float32 tensors.
"""
from __future__ import annotations

import numpy as np
import torch

GROUP_MAX_EPS = 1e-15
_f32 = np.float32


def seqsum(P: torch.Tensor) -> torch.Tensor:
    """Sum of P [n, B] over n, left to right in float32 (C's `s = 0; s += p[i]`) -> [B]."""
    s = P[0] + 0.0
    for row in P[1:]:
        s += row
    return s


def rowsum(P: torch.Tensor) -> torch.Tensor:
    """`seqsum` of each row of P [B, n] -> [B]."""
    return seqsum(P.t().contiguous())


def nearest_int(x: torch.Tensor) -> torch.Tensor:
    """llama.cpp's nearest_int: round half to even (valid for |x| < 2^22)."""
    return torch.round(x)


def sqrtf(x: torch.Tensor) -> torch.Tensor:
    """C's sqrtf, correctly rounded (torch.sqrt on CPU float32 is not: it can be off by one ulp)."""
    return torch.sqrt(x.double()).float()


def _const(v) -> torch.Tensor:
    """A float32 scalar tensor. Write `_const(63) / t`, never `63.0 / t`: torch evaluates a Python
    number divided by a tensor as reciprocal-then-multiply, which is not C's correctly rounded division."""
    return torch.tensor(_f32(v), dtype=torch.float32)


def first_absmax(x: torch.Tensor, dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(amax, the signed value at the first index of max |x|) along `dim`, as `if (ax > amax)` finds."""
    ax = x.abs()
    idx = ax.argmax(dim=dim, keepdim=True)
    return ax.gather(dim, idx).squeeze(dim), x.gather(dim, idx).squeeze(dim)


def _t(x: torch.Tensor | None) -> torch.Tensor | None:
    """[B, n] -> element-major [n, B] (contiguous), the layout every search below works in."""
    return None if x is None else x.t().contiguous()


# Below, x, w, L are element-major [n, B]; per-block values are [B] and broadcast over n.

def make_qx_quants(x: torch.Tensor, nmax: int, qw: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """rmse_type 1. x [B, n] -> (scale [B], L [B, n] in [0, 2·nmax)); value = scale · (L − nmax)."""
    x, qw = _t(x), _t(qw)
    amax, mx = first_absmax(x, dim=0)
    w = qw if qw is not None else x * x
    wx = w * x
    iscale = _const(-nmax) / mx
    l = nearest_int(iscale * x).clamp(-nmax, nmax - 1)
    L = l + nmax
    sumlx = seqsum(wx * l)
    suml2 = seqsum(w * l * l)
    scale = torch.where(suml2 != 0, sumlx / suml2, torch.zeros_like(suml2))
    best = scale * sumlx
    for is_ in range(-9, 10):
        if is_ == 0:
            continue
        c = _f32(nmax) + _f32(0.1) * _f32(is_)
        iscale = -_const(c) / mx
        l = nearest_int(iscale * x).clamp(-nmax, nmax - 1)
        sumlx = seqsum(wx * l)
        suml2 = seqsum(w * l * l)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        L = torch.where(better, l + nmax, L)
        scale = torch.where(better, sumlx / suml2, scale)
        best = torch.where(better, scale * sumlx, best)
    zero = amax < GROUP_MAX_EPS
    return torch.where(zero, 0.0, scale), torch.where(zero, 0.0, L).t()


def make_q3_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """do_rmse=true. x [B, n] -> (scale [B], L [B, n] in [0, 2·nmax)); value = scale · (L − nmax)."""
    x = _t(x)
    amax, mx = first_absmax(x, dim=0)
    iscale = _const(-nmax) / mx
    L = nearest_int(iscale * x).clamp(-nmax, nmax - 1)
    w = x * x
    sumlx = seqsum(w * x * L)
    suml2 = seqsum(w * L * L)
    for _ in range(5):
        changed = torch.zeros_like(amax, dtype=torch.bool)
        for i in range(x.shape[0]):
            wi, xi, Li = w[i], x[i], L[i]
            slx = sumlx - wi * xi * Li
            sl2 = suml2 - wi * Li * Li
            new_l = nearest_int(xi * sl2 / slx).clamp(-nmax, nmax - 1)
            slx_n = slx + wi * xi * new_l
            sl2_n = sl2 + wi * new_l * new_l
            acc = ((slx > 0) & (new_l != Li) & (sl2_n > 0)
                   & (slx_n * slx_n * suml2 > sumlx * sumlx * sl2_n))
            L[i] = torch.where(acc, new_l, Li)
            sumlx = torch.where(acc, slx_n, sumlx)
            suml2 = torch.where(acc, sl2_n, suml2)
            changed |= acc
        if not changed.any():  # a pass without change is a fixed point, per block too
            break
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(suml2))
    zero = amax < GROUP_MAX_EPS
    return torch.where(zero, 0.0, scale), torch.where(zero, 0.0, L + nmax).t()


def _fit_line(x, w, l, sum_w, sum_x):
    """Weighted least squares x ≈ scale·l + min (min ≤ 0), as in make_qkx2/3_quants."""
    wl = w * l
    sum_l = seqsum(wl)
    sum_l2 = seqsum(wl * l)
    sum_xl = seqsum(wl * x)
    D = sum_w * sum_l2 - sum_l * sum_l
    this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
    this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
    pos = this_min > 0
    this_min = torch.where(pos, 0.0, this_min)
    this_scale = torch.where(pos, sum_xl / sum_l2, this_scale)
    return D > 0, this_scale, this_min


def _error(x, w, L, scale, mn, use_mad: bool) -> torch.Tensor:
    diff = scale * L + mn - x
    diff = diff.abs() if use_mad else diff * diff
    return seqsum(w * diff)


def _make_qkx(x, w, nmax, rmin, rdelta, nstep, use_mad, clamp_v: bool):
    x, w = _t(x), _t(w)
    mn = x.amin(dim=0)
    mx = x.amax(dim=0)
    sum_w, sum_x = seqsum(w), seqsum(w * x)
    mn = torch.where(mn > 0, 0.0, mn)
    flat = (mx <= mn) if clamp_v else (mx == mn)
    iscale = _const(nmax) / (mx - mn)
    scale = 1 / iscale
    L = nearest_int(iscale * (x - mn)).clamp(0, nmax)
    best = _error(x, w, L, scale, mn, use_mad)
    nmax_t = _const(nmax)
    for is_ in range(nstep + 1):
        c = _f32(rmin) + _f32(rdelta) * _f32(is_) + _f32(nmax)
        iscale = _const(c) / (mx - mn)
        v = iscale * (x - mn)
        if clamp_v:   # make_qkx3_quants: v > 0 ? nearest_int(MIN(v, nmax)) : 0
            l = torch.where(v > 0, nearest_int(torch.minimum(v, nmax_t)), 0.0)
        else:         # make_qkx2_quants: MAX(0, MIN(nmax, nearest_int(v)))
            l = nearest_int(v).clamp(0, nmax)
        ok, this_scale, this_min = _fit_line(x, w, l, sum_w, sum_x)
        cur = _error(x, w, l, this_scale, this_min, use_mad)
        better = ok & (cur < best)
        L = torch.where(better, l, L)
        best = torch.where(better, cur, best)
        scale = torch.where(better, this_scale, scale)
        mn = torch.where(better, this_min, mn)
    return torch.where(flat, 0.0, scale), -mn, torch.where(flat, 0.0, L).t()


def make_qkx2_quants(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float,
                     nstep: int, use_mad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, w [B, n] -> (scale [B], the_min [B] ≥ 0, L [B, n] in [0, nmax]); value = scale·L − the_min."""
    return _make_qkx(x, w, nmax, rmin, rdelta, nstep, use_mad, clamp_v=False)


def make_qkx3_quants(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float,
                     nstep: int, use_mad: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, w [B, n] -> (scale [B], the_min [B] ≥ 0, L [B, n] in [0, nmax]); value = scale·L − the_min."""
    return _make_qkx(x, w, nmax, rmin, rdelta, nstep, use_mad, clamp_v=True)


def make_qp_quants(x: torch.Tensor, nmax: int, qw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-negative x [B, n] (a super-block's sub-scales) -> (scale [B], L [B, n] in [0, nmax])."""
    x, qw = _t(x), _t(qw)
    mx = torch.clamp(x.amax(dim=0), min=0.0)
    zero = mx < GROUP_MAX_EPS
    iscale = _const(nmax) / mx
    L = nearest_int(iscale * x)
    scale = 1 / iscale
    diff = x - scale * L
    best = seqsum(qw * diff * diff)
    for is_ in range(-4, 5):
        if is_ == 0:
            continue
        iscale_is = _const(_f32(0.1) * _f32(is_) + _f32(nmax)) / mx
        scale_is = 1 / iscale_is
        l = torch.clamp(nearest_int(iscale_is * x), max=nmax)
        diff = x - scale_is * l
        mse = seqsum(qw * diff * diff)
        better = mse < best
        best = torch.where(better, mse, best)
        iscale = torch.where(better, iscale_is, iscale)
    L = torch.clamp(nearest_int(iscale * x), max=nmax)
    sumlx = seqsum(qw * x * L)
    suml2 = seqsum(qw * L * L)
    for _ in range(5):
        changed = torch.zeros_like(mx, dtype=torch.bool)
        for i in range(x.shape[0]):
            wi, xi, Li = qw[i], x[i], L[i]
            slx = sumlx - wi * xi * Li
            sl2 = suml2 - wi * Li * Li
            new_l = torch.clamp(nearest_int(xi * sl2 / slx), max=nmax)
            slx_n = slx + wi * xi * new_l
            sl2_n = sl2 + wi * new_l * new_l
            acc = ((slx > 0) & (sl2 > 0) & (new_l != Li)
                   & (slx_n * slx_n * suml2 > sumlx * sumlx * sl2_n))
            L[i] = torch.where(acc, new_l, Li)
            sumlx = torch.where(acc, slx_n, sumlx)
            suml2 = torch.where(acc, sl2_n, suml2)
            changed |= acc
        if not changed.any():
            break
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(suml2))
    return torch.where(zero, 0.0, scale), torch.where(zero, 0.0, L).t()
