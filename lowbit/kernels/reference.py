"""Pure-PyTorch W4A16: dequantize-then-matmul. The CPU path, and the reference the kernels must equal.

Shapes: X [M, K]; qweight int32 [S, N, 16] (see `layout`); scales [G, N]; zeros uint8 [G, N] or None.
"""
from __future__ import annotations

import torch

from .layout import unpack_kernel

SYM_ZERO = 8


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, in_features: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W_r = (W_q − zero) · scale per group, computed in float32 and rounded once to `dtype`. -> [N, K]"""
    W_q = unpack_kernel(qweight, in_features)
    G = scales.shape[0]
    gs = in_features // G
    s = scales.float().t().repeat_interleave(gs, dim=1)  # [N, K]
    z = SYM_ZERO if zeros is None else zeros.float().t().repeat_interleave(gs, dim=1)
    return ((W_q.float() - z) * s).to(dtype)


def matmul(X: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
           in_features: int) -> torch.Tensor:
    """Y = X · W_rᵀ in X's dtype (float32 W_r rounded to X's dtype, as a dequantized checkpoint holds it)."""
    return X @ dequantize(qweight, scales, zeros, in_features, X.dtype).t()


def dequant_fma(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | float) -> torch.Tensor:
    """The kernels' dequantization, emulated: ``f = 1 + q/16`` from bits, then one FMA.

    Placing the code in the top mantissa bits of 1.0f gives ``f`` exactly without an int→float
    conversion; ``f·(16s) + (−(16+z)·s)`` is then exact in float32 for fp16/bf16 scales (every term
    has ≤ 16 significant bits), so it equals ``(q − z)·s``; float32 scales round ``−(16+z)·s`` once
    (relative error 2⁻²⁴). Shapes broadcast; returns float32.
    """
    bits = (codes.to(torch.int32) << 19) | 0x3F800000
    f = bits.view(torch.float32)
    s = scale.float()
    return torch.addcmul(-(torch.as_tensor(zero, dtype=torch.float32) + 16.0) * s, f, 16.0 * s)
