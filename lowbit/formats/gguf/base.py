"""What every GGUF block type shares: sizes from the table, shape checks, pack/unpack to bytes.

A block type is a Format whose grid is the block's *effective* per-sub-block scale and offset
(what ggml multiplies with after decoding the block's fp16/6-bit/4-bit scale fields), so RTN,
AWQ and GPTQ round onto exactly the values llama.cpp will compute with. Subclasses define:

  _reference(W, qw)        llama.cpp's encoder for whole rows -> (W_q, scale, zero), bit-exact
  quantize_elementwise     the grid (codes for given effective scale/zero)
  dequantize_elementwise   its inverse, the same float32 arithmetic as ggml's dequantize_row_*
  _to_blocks / _from_blocks  codes + effective parameters <-> GGUF block bytes

Shapes: W [out, in] with in a multiple of the block size; QParams [out, in / sub_block].
"""
from __future__ import annotations

import contextlib
from typing import ClassVar, Iterator

import numpy as np
import torch

from ...errors import LowbitError
from ..base import Format, QParams, QuantizedTensor
from .table import BLOCK_TYPES, BlockType, fallback_type


ROWS_PER_CHUNK_WEIGHTS = 1 << 20  # encode about a million weights at a time


class GGUFShapeError(LowbitError):
    """A row length the block type cannot hold (the GGUF writer falls back per tensor)."""


class GGUFFormat(Format):
    """Base of the GGUF block types; subclasses are registered as ``gguf:<type>``."""

    block: ClassVar[BlockType]
    bits: ClassVar[int]           # bits per code
    sym: ClassVar[bool]
    scale_dtype = torch.float16   # d / dmin are fp16 in every block type here
    uses_importance = True        # the imatrix of llama-quantize --imatrix (Q8_0 ignores it)

    def __init_subclass__(cls, type_name: str | None = None, **kw):
        super().__init_subclass__(**kw)
        if type_name is not None:
            cls.block = BLOCK_TYPES[type_name]
            cls.name = f"gguf:{type_name}"
            cls.group_size = cls.block.sub_block

    def __init__(self, bits: int | None = None, group_size: int | None = None, sym: bool | None = None,
                 scale_dtype: torch.dtype | None = None):
        """Bits, group size and scale storage are fixed by the block type; arguments are ignored."""

    @classmethod
    def from_scheme(cls, scheme, scale_dtype: torch.dtype = torch.float32) -> "GGUFFormat":
        return cls()

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    # -- shapes -------------------------------------------------------------------------------
    def groups(self, in_features: int) -> int:
        bs = self.block.block_size
        if in_features % bs:
            coupled = (" (its sub-block scales share one fp16 d per 256 weights, so an algorithm fitting one "
                       "group of columns at a time must fit whole rows instead, e.g. GPTQ with static groups)"
                       if bs > self.group_size else "")
            raise GGUFShapeError(
                f"{self.name} needs rows whose length is a multiple of {bs}, got {in_features}{coupled}; "
                f"a tensor with such rows is written as {fallback_type(self.block.name, in_features)} "
                "(llama-quantize's per-tensor fallback)")
        return in_features // self.group_size

    def group_length(self, in_features: int) -> int:
        return self.group_size

    def bits_per_weight(self, in_features: int) -> float:
        return self.block.bits_per_weight

    def _rows(self, W: torch.Tensor, importance: torch.Tensor | None):
        if W.dim() != 2:
            raise LowbitError(f"{self.name} encodes 2-D weights [out, in], got shape {tuple(W.shape)}")
        self.groups(W.shape[1])
        W = W.detach().float().cpu()
        qw = None
        if importance is not None:
            qw = importance.detach().float().cpu()
            if qw.dim() == 1:
                qw = qw.expand_as(W)
            if qw.shape != W.shape:
                raise LowbitError(f"importance must be [in] or [out, in] = {tuple(W.shape)}, "
                                  f"got {tuple(qw.shape)}")
        return W, qw

    def _clipped(self, W: torch.Tensor, clip) -> torch.Tensor:
        """W with each sub-block squeezed into clip × its [min, max] (clip 1 or None: unchanged)."""
        if clip is None:
            return W
        G = W.reshape(W.shape[0], -1, self.group_size)
        c = torch.as_tensor(clip, dtype=torch.float32)
        c = c.unsqueeze(-1) if c.dim() == 2 else c
        lo, hi = G.amin(-1, keepdim=True) * c, G.amax(-1, keepdim=True) * c
        return torch.minimum(torch.maximum(G, lo), hi).reshape(W.shape)

    # -- the grid ---------------------------------------------------------------------------
    def fit(self, W: torch.Tensor, clip=None, importance: torch.Tensor | None = None) -> QParams:
        """Effective scales/offsets llama.cpp's encoder chooses for W [out, in] (importance:
        imatrix [in] or [out, in], as llama-quantize --imatrix passes it)."""
        _, scale, zero = self._search(W, clip, importance)
        return QParams(scale, zero)

    def encode(self, W: torch.Tensor, clip=None, importance: torch.Tensor | None = None) -> QuantizedTensor:
        """llama.cpp's encoder: codes and parameters whose blocks are the bytes it writes."""
        W_q, scale, zero = self._search(W, clip, importance)
        return QuantizedTensor(W_q, QParams(scale, zero), self)

    def _search(self, W, clip, importance):
        """`_reference` over chunks of rows (rows are independent), bounding the temporaries."""
        W, qw = self._rows(W, importance)
        W = self._clipped(W, clip)
        step = max(1, ROWS_PER_CHUNK_WEIGHTS // W.shape[1])
        with _one_thread():
            parts = [self._reference(W[i:i + step], None if qw is None else qw[i:i + step])
                     for i in range(0, W.shape[0], step)]
        return tuple(torch.cat(p) for p in zip(*parts))

    def fake_quantize(self, W: torch.Tensor, clip=None, importance: torch.Tensor | None = None) -> torch.Tensor:
        return self.encode(W, clip, importance).dequantize()

    def _reference(self, W: torch.Tensor, qw: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    # -- bytes --------------------------------------------------------------------------------
    def _to_blocks(self, W_q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """W_q [N, block_size], scale/zero [N, block_size / sub_block] -> uint8 [N, type_size]."""
        raise NotImplementedError

    def _from_blocks(self, data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """uint8 [N, type_size] -> (W_q [N, block_size], scale [N, n_sub], zero [N, n_sub])."""
        raise NotImplementedError

    def pack(self, qt: QuantizedTensor) -> dict[str, torch.Tensor]:
        """{"weight_blocks": uint8 [out, in / block_size · type_size]}: the GGUF tensor data."""
        if qt.g_idx is not None:
            raise LowbitError(f"{self.name} blocks hold contiguous groups; act-order g_idx cannot be packed")
        out_f, in_f = qt.W_q.shape
        self.groups(in_f)
        bs, n_sub = self.block.block_size, self.block.block_size // self.group_size
        nb = in_f // bs
        data = self._to_blocks(qt.W_q.cpu().reshape(out_f * nb, bs),
                               qt.qparams.scale.float().cpu().reshape(out_f * nb, n_sub),
                               qt.qparams.zero.float().cpu().reshape(out_f * nb, n_sub))
        return {"weight_blocks": data.reshape(out_f, nb * self.block.type_size)}

    def unpack(self, tensors: dict[str, torch.Tensor]) -> QuantizedTensor:
        data = torch.as_tensor(tensors["weight_blocks"]).to(torch.uint8)
        out_f, n_bytes = data.shape
        ts = self.block.type_size
        if n_bytes % ts:
            raise LowbitError(f"{self.name}: a row of {n_bytes} bytes is not a whole number of {ts}-byte blocks")
        nb = n_bytes // ts
        W_q, scale, zero = self._from_blocks(data.reshape(out_f * nb, ts))
        return QuantizedTensor(W_q.reshape(out_f, nb * self.block.block_size),
                               QParams(scale.reshape(out_f, -1), zero.reshape(out_f, -1)), self)

    def to_bytes(self, W: torch.Tensor, importance: torch.Tensor | None = None) -> np.ndarray:
        """W [out, in] -> uint8 [out, row bytes], what gguf.quants.quantize / llama-quantize write."""
        return self.pack(self.encode(W, importance=importance))["weight_blocks"].numpy()

    def from_bytes(self, data) -> torch.Tensor:
        """GGUF tensor bytes uint8 [out, row bytes] -> W_r [out, in] float32."""
        return self.unpack({"weight_blocks": torch.as_tensor(np.asarray(data, dtype=np.uint8))}).dequantize()


# -- helpers shared by the block types ----------------------------------------------------------

@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """The searches are hundreds of small elementwise steps on CPU tensors; torch's threads waiting
    on each other cost more than the work. On 2 busy cores, a Q4_K encode with an imatrix of a
    576 x 1536 weight took 10.6 s on 2 threads and 0.76 s on 1 (Q6_K: 15.5 s and 0.25 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fp16(t: torch.Tensor) -> torch.Tensor:
    """Round to the nearest fp16 (ties to even), back in float32."""
    return t.to(torch.float16).float()


def fp16_bytes(t: torch.Tensor) -> torch.Tensor:
    """float32 values that are fp16-exact [N] -> little-endian bytes uint8 [N, 2]."""
    h = t.to(torch.float16)
    if not torch.equal(h.float(), t) and not torch.isnan(t).any():
        raise LowbitError("a block scale is not representable in fp16; these parameters were not "
                          "produced by this GGUF format's fit")
    return h.contiguous().view(torch.uint8).reshape(-1, 2)


def fp16_from_bytes(b: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 2] -> float32 [N]."""
    return b.contiguous().view(torch.float16).reshape(-1).float()


def check_codes(W_q: torch.Tensor, lo: int, hi: int, name: str) -> torch.Tensor:
    q = W_q.to(torch.int64)
    if q.numel() and (q.min() < lo or q.max() > hi):
        raise LowbitError(f"{name} codes must lie in [{lo}, {hi}]")
    return q
