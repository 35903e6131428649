"""Integer grids: INT2–INT8, asymmetric (min-max, zero point) or symmetric, per group or per channel.

Codes are unsigned, ``W_q ∈ [0, 2^bits − 1]``, and ``W_r = (W_q − zero) · scale``. Symmetric grids
have ``zero = 2^(bits−1)`` and ``scale = absmax / ((2^bits − 1) / 2)``, the convention that
compressed-tensors, GPTQ and AutoAWQ share, so codes export to all of them unchanged.
"""
from __future__ import annotations

import torch

from ..errors import LowbitError
from .base import Format, QParams, QuantizedTensor
from .packing import pack_int32, unpack_int32

_EPS = 1e-8


class IntFormat(Format):
    name = "int"
    row_scalable = True  # W_r = (W_q − zero) · scale, zero in code units

    def __init__(self, bits: int = 4, group_size: int = 128, sym: bool = False,
                 scale_dtype: torch.dtype = torch.float32):
        if not 2 <= bits <= 8:
            raise ValueError(f"int format supports 2..8 bits, got {bits}")
        self.bits = bits
        self.group_size = group_size
        self.sym = sym
        # Scales are stored in this dtype; rounding them here keeps fake-quant equal to the runtime.
        self.scale_dtype = scale_dtype

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    def fit(self, W: torch.Tensor, clip: torch.Tensor | float | None = None) -> QParams:
        """Shapes: W [out, in], clip scalar or [out, n_groups] -> QParams [out, n_groups]."""
        G = self.grouped(W.float())
        wmax = G.amax(dim=-1)
        wmin = G.amin(dim=-1)
        if clip is not None:
            wmax = wmax * clip
            wmin = wmin * clip
        return self.params_from_range(wmin, wmax)

    def params_from_range(self, wmin: torch.Tensor, wmax: torch.Tensor) -> QParams:
        """Grid parameters covering [wmin, wmax] per group (shapes [out, n_groups])."""
        if self.sym:
            absmax = torch.maximum(wmax.abs(), wmin.abs())
            scale = self.stored_scale(absmax / (self.qmax / 2))
            zero = torch.full_like(scale, float(1 << (self.bits - 1)))
        else:
            wmax = wmax.clamp(min=0)
            wmin = wmin.clamp(max=0)
            scale = self.stored_scale((wmax - wmin) / self.qmax)
            zero = torch.round(-wmin / scale).clamp(0, self.qmax)
        return QParams(scale, zero)

    def stored_scale(self, scale: torch.Tensor) -> torch.Tensor:
        return scale.to(self.scale_dtype).float().clamp(min=_EPS)

    # in place on the one fresh temporary: whole-weight calls on an 8B MLP weight hold 235 MB per temporary
    def quantize_elementwise(self, W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return (W / scale).round_().add_(zero).clamp_(0, self.qmax).to(torch.uint8)

    def dequantize_elementwise(self, W_q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return W_q.to(torch.float32, copy=True).sub_(zero).mul_(scale)

    def neighbour_codes(self, W: torch.Tensor, W_q: torch.Tensor,
                        qp: QParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`Format.neighbour_codes` on an evenly spaced grid: the neighbour is W_q ± 1, one scale away
        (no trial decoding: DH-AWQ asks for it at every α grid point)."""
        scale, zero = self.per_weight(qp, W.shape[1])
        up = W >= self.dequantize_elementwise(W_q, scale, zero)  # on the grid exactly: up, as DH-AWQ does
        wide = W_q.to(torch.int16) + torch.where(up, 1, -1).to(torch.int16)
        valid = (wide >= 0) & (wide <= self.qmax)
        codes = wide.clamp_(0, self.qmax).to(W_q.dtype)
        return codes, torch.where(valid, torch.where(up, scale, -scale), 0.0), valid

    def bits_per_weight(self, in_features: int) -> float:
        gl = self.group_length(in_features)
        meta = 16 + (0 if self.sym else self.bits)
        return self.bits + meta / gl

    def pack(self, qt: QuantizedTensor) -> dict[str, torch.Tensor]:
        """compressed-tensors ``pack-quantized`` layout, lossless (scales kept in float32):

          weight_packed       int32 [out, ⌈in·b/32⌉]   codes W_q as a dense bitstream along in
          weight_scale        float32 [out, G]
          weight_zero_point   int32 [⌈out·b/32⌉, G]    zeros packed along out (asymmetric only)
          weight_shape        int64 [2]
          weight_g_idx        int32 [in]               (act-order only)
        """
        out_f, in_f = qt.W_q.shape
        t = {
            "weight_packed": pack_int32(qt.W_q, self.bits),
            "weight_scale": qt.qparams.scale.float().contiguous(),
            "weight_shape": torch.tensor([out_f, in_f], dtype=torch.int64),
        }
        if not self.sym:
            zero = qt.qparams.zero.float()
            if not torch.equal(zero, zero.round().clamp(0, self.qmax)):
                raise LowbitError("int zero points must be integers in [0, 2^bits - 1] to be packed")
            t["weight_zero_point"] = pack_int32(zero.to(torch.uint8).T, self.bits).T.contiguous()
        if qt.g_idx is not None:
            t["weight_g_idx"] = qt.g_idx.to(torch.int32)
        return t

    def unpack(self, tensors: dict[str, torch.Tensor]) -> QuantizedTensor:
        out_f, in_f = (int(v) for v in tensors["weight_shape"])
        scale = tensors["weight_scale"].float()
        W_q = unpack_int32(tensors["weight_packed"], self.bits, in_f)
        if self.sym:
            zero = torch.full_like(scale, float(1 << (self.bits - 1)))
        else:
            zero = unpack_int32(tensors["weight_zero_point"].T, self.bits, out_f).T.float().contiguous()
        g_idx = tensors.get("weight_g_idx")
        return QuantizedTensor(W_q, QParams(scale, zero), self, g_idx)
