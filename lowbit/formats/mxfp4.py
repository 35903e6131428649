"""MXFP4 (OCP Microscaling v1.0): E2M1 elements in blocks of 32 sharing one E8M0 scale.

Grid: X = 2^(⌊log2 amax⌋ − 2) per block of 32 (2 = emax of E2M1, whose largest value is 6 =
1.5·2²); elements W/X are rounded to the nearest E2M1 value {0, 0.5, 1, 1.5, 2, 3, 4, 6} (ties
to the even mantissa) and saturate at ±6; W_r = e2m1 · X. ⌊log2 amax⌋ is taken exactly from
the float's exponent; the scale exponent is clamped to E8M0's range [−127, 127] (an all-zero
block gets 2^−127). Codes are the 4-bit E2M1 patterns (sign · 8 + magnitude index; a negative
value that rounds to zero keeps its sign, −0, as compressed-tensors packs it).
QParams: scale = X (float32), zero unused (zeros).

Storage (`pack`, compressed-tensors ``mxfp4-pack-quantized``):
  weight_packed   uint8 [out, in/2]    element 2i in the low nibble
  weight_scale    uint8 [out, in/32]   E8M0: biased exponent (e + 127)
bits per weight: 4 + 8/32 = 4.25.
"""
from __future__ import annotations

import torch

from ..errors import LowbitError
from .base import Format, QParams, QuantizedTensor
from .packing import pack_nibbles, unpack_nibbles

E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
_E2M1_MIDS = (E2M1_VALUES[:-1] + E2M1_VALUES[1:]) / 2
E2M1_EMAX = 2
E8M0_BIAS = 127


def e2m1_codes(y: torch.Tensor) -> torch.Tensor:
    """Round y to the nearest E2M1 value (ties to even, saturating at ±6) -> 4-bit codes uint8."""
    a = y.abs()
    mids = _E2M1_MIDS.to(y.device)
    k = torch.searchsorted(mids, a.contiguous())           # number of midpoints strictly below a
    tie = (k < 7) & (a == mids[k.clamp(max=6)]) & (k % 2 == 1)
    idx = (k + tie.long()).clamp(max=7)
    sign = torch.signbit(y)  # a negative value rounding to zero stays −0 (code 8), as compressed-tensors packs it
    return (idx | (sign.long() << 3)).to(torch.uint8)


def e2m1_values(codes: torch.Tensor) -> torch.Tensor:
    """4-bit E2M1 codes -> float32 values."""
    c = codes.long()
    v = E2M1_VALUES.to(codes.device)[c & 7]
    return torch.where((c & 8) != 0, -v, v)


def floor_log2(x: torch.Tensor) -> torch.Tensor:
    """⌊log2 x⌋ for x > 0, exactly (from the float's exponent, not from a rounded log2)."""
    _, e = torch.frexp(x)
    return e.to(torch.int64) - 1


class E2M1Grid(Format):
    """Formats whose elements are FP4 E2M1 values times a per-block scale (MXFP4, NVFP4)."""

    def quantize_elementwise(self, W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return e2m1_codes(W / scale)

    def dequantize_elementwise(self, W_q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return e2m1_values(W_q) * scale

    def _check_packable(self, qt: QuantizedTensor) -> None:
        if qt.g_idx is not None:
            raise LowbitError(f"{self.name} blocks hold contiguous groups; act-order g_idx cannot be packed")
        self.groups(qt.W_q.shape[1])


class MXFP4Format(E2M1Grid):
    name = "mxfp4"
    sym = True

    def __init__(self, bits: int = 4, group_size: int = 32, sym: bool = True,
                 scale_dtype: torch.dtype = torch.float32):
        if bits != 4:
            raise LowbitError(f"mxfp4 has 4-bit elements; got --bits {bits}")
        self.bits = 4
        self.group_size = 32  # fixed by the MX spec
        self.scale_dtype = torch.float32

    @classmethod
    def from_scheme(cls, scheme, scale_dtype: torch.dtype = torch.float32) -> "MXFP4Format":
        return cls()  # element width and block size are fixed by the format

    def fit(self, W: torch.Tensor, clip: torch.Tensor | float | None = None) -> QParams:
        """Shapes: W [out, in] -> scale [out, in/32] (powers of two)."""
        amax = self.grouped(W.float()).abs().amax(dim=-1)
        if clip is not None:
            amax = amax * clip
        exp = torch.where(amax > 0, floor_log2(amax) - E2M1_EMAX, torch.full_like(amax, -127, dtype=torch.int64))
        exp = exp.clamp(-127, 127)
        scale = torch.ldexp(torch.ones_like(amax), exp)
        return QParams(scale, torch.zeros_like(scale))

    def bits_per_weight(self, in_features: int) -> float:
        return 4 + 8 / 32

    def pack(self, qt: QuantizedTensor) -> dict[str, torch.Tensor]:
        self._check_packable(qt)
        scale = qt.qparams.scale.float()
        mant, exp = torch.frexp(scale)
        e = exp.to(torch.int64) - 1
        if not (torch.all(mant == 0.5) and torch.all((e >= -127) & (e <= 127))):
            raise LowbitError("mxfp4 scales must be powers of two in [2^-127, 2^127] (E8M0)")
        return {"weight_packed": pack_nibbles(qt.W_q), "weight_scale": (e + E8M0_BIAS).to(torch.uint8)}

    def unpack(self, tensors: dict[str, torch.Tensor]) -> QuantizedTensor:
        W_q = unpack_nibbles(tensors["weight_packed"])
        e = tensors["weight_scale"].to(torch.int64) - E8M0_BIAS
        scale = torch.ldexp(torch.ones(e.shape), e)
        return QuantizedTensor(W_q, QParams(scale, torch.zeros_like(scale)), self)
