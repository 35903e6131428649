"""Q4_X: a symmetric INT4 group-32 checkpoint written as Q4_0 blocks without re-quantizing.

A QAT / GPTQ INT4 checkpoint stores codes c ∈ [−8, 7] and one scale s per 32 weights, W = c·s.
Q4_0 stores W = (nibble − 8)·d per 32 weights. With d = s and nibble = c + 8 the two grids are
the same, so the Q4_0 file reproduces the INT4 weights exactly whenever s is representable in
fp16 (bf16/fp16 checkpoint scales almost always are). Plain Q4_0 re-quantization instead picks
d = max/−8 from the dequantized weights, which moves every block whose absmax code is +7 rather
than −8 onto a different grid (about 1–2 % of amax error).

Shapes: codes [out, in] (int, −8..7), scales [out, in/32].
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ...errors import LowbitError
from ..base import QParams, QuantizedTensor
from .legacy import Q4_0


def _check(codes: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if codes.dim() != 2 or codes.shape[1] % 32:
        raise LowbitError(f"Q4_X needs codes [out, in] with in a multiple of 32, got {tuple(codes.shape)}")
    if scales.shape != (codes.shape[0], codes.shape[1] // 32):
        raise LowbitError(f"Q4_X needs one scale per 32 codes: scales {tuple(scales.shape)} for codes "
                          f"{tuple(codes.shape)}")
    c = codes.to(torch.int64)
    if c.numel() and (c.min() < -8 or c.max() > 7):
        raise LowbitError("Q4_X codes must be signed INT4 values in [-8, 7]")
    return c, scales.float()


def q4x_quantized(codes: torch.Tensor, scales: torch.Tensor) -> QuantizedTensor:
    """INT4 codes + group-32 scales -> a gguf:q4_0 QuantizedTensor with d = scale, nibble = code + 8.

    d is stored in fp16; a scale that fp16 cannot represent is rounded (see `q4x_fidelity`).
    """
    c, s = _check(codes, scales)
    d = s.to(torch.float16).float()
    return QuantizedTensor((c + 8).to(torch.uint8), QParams(d, torch.full_like(d, 8.0)), Q4_0())


def q4x_bytes(codes: torch.Tensor, scales: torch.Tensor) -> np.ndarray:
    """The Q4_0 tensor data (uint8 [out, in/32·18]) of the INT4 checkpoint."""
    return Q4_0().pack(q4x_quantized(codes, scales))["weight_blocks"].numpy()


@dataclass(frozen=True)
class Fidelity:
    """Agreement of a reconstruction with the INT4 source weights."""

    cosine: float
    max_abs_err: float
    rel_max_abs_err: float  # max |W_r − W| / max |W|

    def __str__(self) -> str:
        return f"cos {self.cosine:.8f}, max|err| {self.max_abs_err:.3g} ({100 * self.rel_max_abs_err:.3f}% of amax)"


def _fidelity(W: torch.Tensor, W_r: torch.Tensor) -> Fidelity:
    W, W_r = W.double().flatten(), W_r.double().flatten()
    denom = W.norm() * W_r.norm()
    cos = float((W @ W_r) / denom) if denom > 0 else float(torch.equal(W, W_r))
    err = float((W_r - W).abs().max()) if W.numel() else 0.0
    amax = float(W.abs().max()) if W.numel() else 0.0
    return Fidelity(cos, err, err / amax if amax > 0 else 0.0)


def q4x_fidelity(codes: torch.Tensor, scales: torch.Tensor) -> dict[str, Fidelity]:
    """{"q4_0": plain Q4_0 re-quantization of the dequantized INT4 weights, "q4_x": this mapping}."""
    c, s = _check(codes, scales)
    W = (c.float() * s.repeat_interleave(32, dim=1))
    fmt = Q4_0()
    plain = fmt.encode(W).dequantize()
    q4x = q4x_quantized(codes, scales).dequantize()
    return {"q4_0": _fidelity(W, plain), "q4_x": _fidelity(W, q4x)}
