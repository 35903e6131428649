"""FP8 weights (E4M3 or E5M2) with a float32 scale per tensor, per output channel or per group.

Grid: W_r = fp8(W / s) · s, rounding to nearest-even and saturating at the format's largest finite
value (448 for E4M3, 57344 for E5M2), with s = amax / fmax over the tensor, the row or the group
(a zero amax gets float32 eps, as compressed-tensors does). Codes W_q are the fp8 bit patterns as
uint8; rounding is torch's own cast to float8_e4m3fn / float8_e5m2. QParams: scale = s broadcast
to [out, n_groups], zero unused (zeros).

Storage (`pack`, compressed-tensors ``float-quantized``):
  weight         float8 [out, in]
  weight_scale   float32 [1] (tensor), [out, 1] (channel) or [out, G] (group)
bits per weight: 8 + 32/g for groups and channels (g = in), 8 (+32 per tensor) per tensor.
"""
from __future__ import annotations

import torch

from ..errors import LowbitError
from .base import Format, QParams, QuantizedTensor

_EPS = torch.finfo(torch.float32).eps


class _FP8Format(Format):
    dtype: torch.dtype
    sym = True

    def __init__(self, bits: int = 8, group_size: int = 0, sym: bool = True,
                 scale_dtype: torch.dtype = torch.float32, per_tensor: bool = False,
                 tensor_scale: float | None = None):
        if bits != 8:
            raise LowbitError(f"{self.name} stores 8-bit floats; got --bits {bits}")
        self.bits = 8
        self.per_tensor = per_tensor
        self.group_size = 0 if per_tensor else group_size
        self.tensor_scale = tensor_scale
        self.scale_dtype = torch.float32
        self.fmax = torch.finfo(self.dtype).max

    @property
    def row_scalable(self) -> bool:
        return not self.per_tensor

    @classmethod
    def from_scheme(cls, scheme, scale_dtype: torch.dtype = torch.float32) -> "_FP8Format":
        return cls(group_size=scheme.group_size)  # 8 bits by definition; 0 = per channel

    def for_tensor(self, W: torch.Tensor) -> "_FP8Format":
        """Per-tensor grids: fix the scale from the whole weight (for algorithms fitting slices)."""
        if not self.per_tensor:
            return self
        return type(self)(per_tensor=True, tensor_scale=float(self._scale_of(W.float().abs().amax())))

    def _scale_of(self, amax: torch.Tensor) -> torch.Tensor:
        s = amax / self.fmax
        return torch.where(s == 0, torch.tensor(_EPS), s)

    def fit(self, W: torch.Tensor, clip: torch.Tensor | float | None = None) -> QParams:
        """Shapes: W [out, in] -> scale [out, n_groups] (one value everywhere per tensor)."""
        G = self.grouped(W.float())
        if self.per_tensor:
            if self.tensor_scale is not None:
                s = torch.tensor(self.tensor_scale, dtype=torch.float32)
            else:
                amax = G.abs().amax()
                s = self._scale_of(amax * clip if clip is not None else amax)
            scale = s.expand(G.shape[:2]).clone()
        else:
            amax = G.abs().amax(dim=-1)
            scale = self._scale_of(amax * clip if clip is not None else amax)
        return QParams(scale, torch.zeros_like(scale))

    def quantize_elementwise(self, W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return torch.clamp(W / scale, -self.fmax, self.fmax).to(self.dtype).view(torch.uint8)

    def dequantize_elementwise(self, W_q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return W_q.contiguous().view(self.dtype).float() * scale

    def bits_per_weight(self, in_features: int) -> float:
        return 8.0 if self.per_tensor else 8 + 32 / self.group_length(in_features)

    def pack(self, qt: QuantizedTensor) -> dict[str, torch.Tensor]:
        if qt.g_idx is not None:
            raise LowbitError(f"{self.name}: act-order g_idx cannot be packed")
        scale = qt.qparams.scale.float()
        if self.per_tensor:
            if not torch.all(scale == scale.reshape(-1)[0]):
                raise LowbitError(f"{self.name} per-tensor: the grid has more than one scale; fit the whole "
                                  "weight (or use for_tensor) before quantizing slices")
            scale = scale.reshape(-1)[:1]
        return {"weight": qt.W_q.contiguous().view(self.dtype), "weight_scale": scale.contiguous()}

    def unpack(self, tensors: dict[str, torch.Tensor]) -> QuantizedTensor:
        w = tensors["weight"]
        W_q = w.contiguous().view(torch.uint8)
        scale = tensors["weight_scale"].float()
        out_f, in_f = W_q.shape
        n_groups = self.groups(in_f)
        scale = scale.reshape(1, 1).expand(out_f, n_groups).clone() if scale.numel() == 1 else scale.reshape(out_f, -1)
        return QuantizedTensor(W_q, QParams(scale, torch.zeros_like(scale)), self)


class FP8E4M3Format(_FP8Format):
    name = "fp8_e4m3"
    dtype = torch.float8_e4m3fn


class FP8E5M2Format(_FP8Format):
    name = "fp8_e5m2"
    dtype = torch.float8_e5m2
