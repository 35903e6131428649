"""NF4: bitsandbytes' 4-bit NormalFloat code book with an absmax scale per block.

Grid: W_r = NF4[W_q] · absmax for each block of `group_size` consecutive weights (bitsandbytes'
default blocksize is 64); codes are the nearest code-book entry to W/absmax (bitsandbytes
bucketizes against the midpoints, a tie going to the lower entry). QParams: scale = absmax
(float32), zero unused (zeros).

Storage (`pack`, bitsandbytes' Params4bit / QuantState layout):
  weight             uint8 [out·in/2, 1]   two codes per byte, the first in the high nibble
  absmax             float32 [n_blocks]    (double_quant: uint8 codes, see below)
  quant_map          float32 [16]          the NF4 code book
  shape              int64 [2]
With double_quant=True the absmax values are compressed as bitsandbytes does
(compress_statistics): offset = mean(absmax), then absmax − offset quantized blockwise (256 per
block) to its signed 8-bit dynamic code (through the same 65536-entry table as bitsandbytes' CPU
kernel, so the bytes match):
  absmax             uint8 [n_blocks]
  nested_absmax      float32 [⌈n_blocks/256⌉]
  nested_quant_map   float32 [256]
  nested_offset      float32 [1]
bits per weight: 4 + 32/g, or 4 + 8/g + 32/(256·g) with double quantization (g = 64: 4.5 vs
4.127). As in bitsandbytes, the codes are chosen against the float32 absmax and only the stored
absmax is compressed, so `unpack(pack(qt))` returns qt's codes exactly and, with double_quant,
the decompressed absmax the runtime will use.
"""
from __future__ import annotations

import functools

import torch

from ..errors import LowbitError
from .base import Format, QParams, QuantizedTensor
from .packing import pack_nibbles, unpack_nibbles

NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], dtype=torch.float32)
_NF4_MID = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2

DQ_BLOCK = 256


def dynamic_code() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic code (create_dynamic_map(signed=True)), float32 [256]."""
    data: list[float] = []
    for i in range(7):
        boundaries = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)


@functools.lru_cache(maxsize=1)
def _dynamic_lut() -> torch.Tensor:
    """bitsandbytes' CPU lookup table: for each of 65536 evenly spaced points of [-1, 1], the
    nearest entry of the dynamic code (a tie going to the lower entry)."""
    rep = (torch.arange(65536, dtype=torch.float64) / 65535 * 2 - 1).float()
    return (rep[:, None] - dynamic_code()).abs().argmin(dim=1).to(torch.uint8)


def quantize_blockwise(A: torch.Tensor, blocksize: int = DQ_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' CPU 8-bit quantize_blockwise with the dynamic code: A [n] -> (codes uint8 [n],
    absmax float32 [⌈n/blocksize⌉]). Like bitsandbytes 0.50 it reads the code off a 65536-entry
    table indexed by ⌊((x/absmax + 1)·0.5)·65535 + 0.5⌋, not by an exact nearest search."""
    n = A.numel()
    pad = -n % blocksize
    blocks = torch.nn.functional.pad(A.float(), (0, pad)).reshape(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    normed = (blocks / absmax[:, None]).reshape(-1)[:n].clamp(-1, 1)
    idx = torch.floor(((normed + 1) * 0.5) * 65535 + 0.5).long()
    return _dynamic_lut()[idx], absmax


class NF4Format(Format):
    name = "nf4"
    sym = True
    row_scalable = True  # W_r = code · absmax

    def __init__(self, bits: int = 4, group_size: int = 64, sym: bool = True,
                 scale_dtype: torch.dtype = torch.float32, double_quant: bool = False):
        if bits != 4:
            raise LowbitError(f"nf4 is a 4-bit code book; got --bits {bits}")
        self.bits = 4
        self.group_size = group_size
        self.double_quant = double_quant
        self.scale_dtype = torch.float32  # bitsandbytes keeps absmax in float32

    @classmethod
    def from_scheme(cls, scheme, scale_dtype: torch.dtype = torch.float32) -> "NF4Format":
        return cls(group_size=scheme.group_size)  # 4 bits by definition; the block size is the scheme's

    def fit(self, W: torch.Tensor, clip: torch.Tensor | float | None = None) -> QParams:
        """Shapes: W [out, in] -> absmax [out, n_groups] (times clip), zero zeros."""
        absmax = self.grouped(W.float()).abs().amax(dim=-1)
        if clip is not None:
            absmax = absmax * clip
        return QParams(absmax, torch.zeros_like(absmax))

    def quantize_elementwise(self, W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        scaled = torch.clamp(W * (1.0 / scale.clamp(min=1e-38)), -1, 1)
        return torch.bucketize(scaled, _NF4_MID.to(W.device)).to(torch.uint8)

    def dequantize_elementwise(self, W_q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return NF4_CODE.to(W_q.device)[W_q.long()] * scale

    def bits_per_weight(self, in_features: int) -> float:
        g = self.group_length(in_features)
        return 4 + (8 / g + 32 / (DQ_BLOCK * g) if self.double_quant else 32 / g)

    def pack(self, qt: QuantizedTensor) -> dict[str, torch.Tensor]:
        if qt.g_idx is not None:
            raise LowbitError("nf4 blocks hold contiguous groups; act-order g_idx cannot be packed")
        out_f, in_f = qt.W_q.shape
        self.groups(in_f)
        if (out_f * in_f) % 2:
            raise LowbitError("nf4 packs two codes per byte; the weight has an odd number of elements")
        absmax = qt.qparams.scale.float().reshape(-1).contiguous()
        t = {
            "weight": pack_nibbles(qt.W_q.reshape(-1), high_first=True).unsqueeze(1),
            "quant_map": NF4_CODE.clone(),
            "shape": torch.tensor([out_f, in_f], dtype=torch.int64),
        }
        if not self.double_quant:
            t["absmax"] = absmax
            return t
        offset = absmax.mean()
        q, absmax2 = quantize_blockwise(absmax - offset)
        t.update(absmax=q, nested_absmax=absmax2, nested_quant_map=dynamic_code(),
                 nested_offset=offset.reshape(1))
        return t

    def unpack(self, tensors: dict[str, torch.Tensor]) -> QuantizedTensor:
        out_f, in_f = (int(v) for v in tensors["shape"])
        W_q = unpack_nibbles(tensors["weight"].reshape(-1), high_first=True)[: out_f * in_f].reshape(out_f, in_f)
        absmax = tensors["absmax"]
        if absmax.dtype == torch.uint8:  # double-quantized: code[q] · absmax2 + offset
            absmax2 = tensors["nested_absmax"].float().repeat_interleave(DQ_BLOCK)[: absmax.numel()]
            absmax = tensors["nested_quant_map"].float()[absmax.long()] * absmax2
            absmax = absmax + tensors["nested_offset"].float()
        scale = absmax.float().reshape(out_f, -1)
        return QuantizedTensor(W_q, QParams(scale, torch.zeros_like(scale)), self)
