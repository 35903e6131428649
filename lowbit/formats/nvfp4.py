"""NVFP4: E2M1 elements in blocks of 16 with an FP8 E4M3 block scale and an FP32 tensor scale.

Grid (NVIDIA ModelOpt / compressed-tensors ``nvfp4-pack-quantized``): with the tensor's global
scale g = 448·6 / amax(W) (its inverse, amax/(6·448), is ModelOpt's per-tensor weight_scale_2),
each block of 16 gets the FP8 scale s = e4m3(g · amax_block / 6) (0 → 0.125, as compressed-tensors)
and the effective scale X = s / g; elements W/X are rounded to E2M1 like MXFP4 (ties to even,
saturating at ±6): W_r = e2m1 · X. QParams: scale = X (float32, [out, in/16]); zero holds g
broadcast (the grid does not use it; `pack` needs it, and it survives the plan file).

g is computed from the W given to `fit`; algorithms that fit column slices (GPTQ) must fix it
from the whole weight first with `for_tensor(W)`, or `pack` refuses the mixed scales.

Storage (`pack`):
  weight_packed        uint8 [out, in/2]    element 2i in the low nibble
  weight_scale         float8_e4m3fn [out, in/16]
  weight_global_scale  float32 [1]          g
bits per weight: 4 + 8/16 = 4.5 (+32 per tensor).
"""
from __future__ import annotations

import torch

from ..errors import LowbitError
from .base import QParams, QuantizedTensor
from .mxfp4 import E2M1Grid
from .packing import pack_nibbles, unpack_nibbles

FP8_MAX = 448.0
FP4_MAX = 6.0
_FP8_EPS = 0.125  # compressed-tensors' replacement for a zero FP8 scale


def global_scale(W: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' generate_gparam: 448·6 / amax(W) as float32 (1 when that is not finite).

    Written as compressed-tensors writes it, a Python float over a tensor, which torch evaluates as
    2688 · (1/amax); the correctly rounded quotient can differ in the last bit.
    """
    amax = W.float().abs().amax().clamp(min=torch.finfo(torch.float32).tiny)
    g = FP8_MAX * FP4_MAX / amax
    return torch.nan_to_num(g, nan=1.0, posinf=1.0, neginf=1.0)


def _e4m3(s: torch.Tensor) -> torch.Tensor:
    return s.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


class NVFP4Format(E2M1Grid):
    name = "nvfp4"
    sym = True

    def __init__(self, bits: int = 4, group_size: int = 16, sym: bool = True,
                 scale_dtype: torch.dtype = torch.float32, global_scale: float | None = None):
        if bits != 4:
            raise LowbitError(f"nvfp4 has 4-bit elements; got --bits {bits}")
        self.bits = 4
        self.group_size = 16  # fixed by the format
        self.scale_dtype = torch.float32
        self.global_scale = global_scale

    @classmethod
    def from_scheme(cls, scheme, scale_dtype: torch.dtype = torch.float32) -> "NVFP4Format":
        return cls()  # element width and block size are fixed by the format

    def for_tensor(self, W: torch.Tensor) -> "NVFP4Format":
        return NVFP4Format(global_scale=float(global_scale(W)))

    def fit(self, W: torch.Tensor, clip: torch.Tensor | float | None = None) -> QParams:
        """Shapes: W [out, in] -> scale [out, in/16] (= fp8 block scale / g), zero [out, in/16] (= g)."""
        g = (torch.tensor(self.global_scale, dtype=torch.float32) if self.global_scale is not None
             else global_scale(W))
        amax = self.grouped(W.float()).abs().amax(dim=-1)
        if clip is not None:
            amax = amax * clip
        s = _e4m3(g * (amax / FP4_MAX)).float()
        s = torch.where(s == 0, torch.tensor(_FP8_EPS), s)
        return QParams(s / g, g.expand_as(s).clone())

    def bits_per_weight(self, in_features: int) -> float:
        return 4 + 8 / 16

    def pack(self, qt: QuantizedTensor) -> dict[str, torch.Tensor]:
        self._check_packable(qt)
        g = qt.qparams.zero.float()
        if g.numel() == 0 or not torch.all(g == g.reshape(-1)[0]):
            raise LowbitError("nvfp4 needs one global scale per tensor, but the grid holds several; "
                              "fit the whole weight, or call fmt.for_tensor(W) before fitting slices")
        g = g.reshape(-1)[0]
        eff = qt.qparams.scale.float()
        s = _e4m3(eff * g)
        if not torch.equal(s.float() / g, eff):
            raise LowbitError("nvfp4 scales are not an fp8 value divided by the global scale; they were "
                              "not produced by this format's fit")
        return {"weight_packed": pack_nibbles(qt.W_q), "weight_scale": s,
                "weight_global_scale": g.reshape(1).clone()}

    def unpack(self, tensors: dict[str, torch.Tensor]) -> QuantizedTensor:
        W_q = unpack_nibbles(tensors["weight_packed"])
        g = tensors["weight_global_scale"].float().reshape(())
        scale = tensors["weight_scale"].float() / g
        return QuantizedTensor(W_q, QParams(scale, g.expand_as(scale).clone()), self)
