"""QuantLinear: an nn.Linear whose INT4 group-wise weights stay packed on the device."""
from __future__ import annotations

import torch
from torch import nn

from . import reference
from .layout import kernel_group_ok, pack_kernel, pack_qparams, unpack_checkpoint


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


_TRITON = triton_available()


class QuantLinear(nn.Module):
    """y = x · W_rᵀ + b, W_r = (W_q − zero) · scale per group of `group_size` input columns.

    Buffers, in the kernels' layout (see `layout`): qweight int32 [ceil(in/128), out, 16];
    scales [G, out]; zeros uint8 [G, out], or None for a symmetric grid (zero 8); bias [out] or None.
    On CUDA with fp16/bf16 inputs one fused Triton kernel dequantizes and multiplies; anywhere
    else (CPU, float32) the weights are dequantized on the fly and torch multiplies.
    """

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 in_features: int, bias: torch.Tensor | None = None):
        super().__init__()
        G, out_features = scales.shape
        if qweight.dtype != torch.int32 or qweight.shape != (-(-in_features // 128), out_features, 16):
            raise ValueError(f"qweight {tuple(qweight.shape)} {qweight.dtype} does not fit "
                             f"[{-(-in_features // 128)}, {out_features}, 16] int32")
        if in_features % G:
            raise ValueError(f"{G} groups do not divide in_features {in_features}")
        if zeros is not None and (zeros.shape != scales.shape or zeros.dtype != torch.uint8):
            raise ValueError("zeros must be uint8 with the shape of scales")
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = in_features // G
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)
        self.register_buffer("bias", bias)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_codes(cls, W_q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                   bias: torch.Tensor | None = None) -> "QuantLinear":
        """Shapes: W_q uint8 [out, in]; scale [out, G]; zero [out, G] (integer-valued) or None (= 8)."""
        zeros = None if zero is None else zero.round().to(torch.uint8).t().contiguous()
        return cls(pack_kernel(W_q), scale.t().contiguous(), zeros, W_q.shape[1], bias)

    @classmethod
    def from_checkpoint(cls, weight_packed: torch.Tensor, weight_scale: torch.Tensor, weight_shape,
                        weight_zero_point: torch.Tensor | None = None,
                        bias: torch.Tensor | None = None) -> "QuantLinear":
        """From one linear's compressed-tensors pack-quantized tensors (4 bits)."""
        shape = tuple(int(v) for v in weight_shape)
        W_q, zero = unpack_checkpoint(weight_packed, shape, weight_zero_point)
        return cls.from_codes(W_q, weight_scale, zero, bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt) -> "QuantLinear":
        """Quantize `linear` in memory on `fmt`'s grid (an IntFormat of 4 bits; RTN)."""
        if fmt.bits != 4:
            raise ValueError(f"QuantLinear holds 4-bit weights, not {fmt.bits}")
        qt = fmt.encode(linear.weight.detach())
        bias = None if linear.bias is None else linear.bias.detach().clone()
        scale = qt.qparams.scale.to(linear.weight.dtype)
        return cls.from_codes(qt.W_q, scale, None if fmt.sym else qt.qparams.zero, bias)

    @classmethod
    def cat(cls, layers: list["QuantLinear"]) -> "QuantLinear":
        """One layer computing all of `layers` (same input, same grouping) side by side along out."""
        first = layers[0]
        if any(l.in_features != first.in_features or l.group_size != first.group_size
               or (l.zeros is None) != (first.zeros is None) for l in layers):
            raise ValueError("QuantLinear.cat needs layers of one input size, group size and symmetry")
        zeros = None if first.zeros is None else torch.cat([l.zeros for l in layers], 1)
        bias = None
        if any(l.bias is not None for l in layers):
            bias = torch.cat([l.bias if l.bias is not None else l.scales.new_zeros(l.out_features) for l in layers])
        return cls(torch.cat([l.qweight for l in layers], 1), torch.cat([l.scales for l in layers], 1), zeros,
                   first.in_features, bias)

    # ---- compute -------------------------------------------------------------------------------
    def uses_kernel(self, x: torch.Tensor) -> bool:
        return (_TRITON and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)
                and kernel_group_ok(self.group_size, self.in_features))

    def _qparams(self, x: torch.Tensor) -> torch.Tensor:
        """Scales and zero points packed for the kernel (`layout.pack_qparams`), built once per dtype
        and device and kept (4 bytes per group and row; not a buffer, so not in the state dict)."""
        key = (x.dtype, self.scales.device, self.scales.data_ptr())
        cache = self.__dict__.setdefault("_qp_cache", {})
        if key not in cache:
            cache.clear()
            cache[key] = pack_qparams(self.scales, self.zeros, x.dtype)
        return cache[key]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W_r [out, in]."""
        return reference.dequantize(self.qweight, self.scales, self.zeros, self.in_features, dtype)

    def forward(self, x: torch.Tensor, accumulate_into: torch.Tensor | None = None,
                norm: tuple[torch.Tensor, float] | None = None, glu: bool = False) -> torch.Tensor:
        """x [..., in] -> [..., out]; with `accumulate_into` ([..., out], x's dtype) adds into it in place.

        Inputs the kernel prepares itself as it loads them (one launch fewer each in a decode step):
        norm = (γ [in], eps) multiplies rms_norm(x) · γ; glu takes x [..., 2·in] = gate|up and
        multiplies silu(gate) · up.
        """
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        acc2 = None if accumulate_into is None else accumulate_into.view(-1, self.out_features)
        if self.uses_kernel(x2):
            from .triton_w4a16 import w4a16_matmul
            y = w4a16_matmul(x2.contiguous(), self.qweight, self.scales, self.zeros, self.in_features,
                             out=acc2, accumulate=acc2 is not None, qparams=self._qparams(x2), norm=norm, glu=glu)
        else:
            from . import decode_ops
            if norm is not None:
                x2 = decode_ops.rms_norm(x2, *norm)
            if glu:
                x2 = decode_ops.silu_mul(x2)
            y = reference.matmul(x2, self.qweight, self.scales, self.zeros, self.in_features)
            if acc2 is not None:
                y = acc2.add_(y)
        if self.bias is not None:
            y.add_(self.bias.to(y.dtype))
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        sym = "sym" if self.zeros is None else "asym"
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 g{self.group_size} {sym}"
