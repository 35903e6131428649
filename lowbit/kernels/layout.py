"""INT4 weight layouts: the checkpoint's, and the one the Triton kernels read.

Pure tensor code (any device), no Triton. Names: ``W_q`` unsigned codes uint8 [N, K] (N = out
features, K = in features), ``zero`` integer zero points [N, G], ``scale`` [N, G], G = K / group_size.

Checkpoint (compressed-tensors ``pack-quantized``, 4 bits)::

  weight_packed      int32 [N, K/8]          column 8c+i in bits 4i..4i+3 of word c (low bits first)
  weight_zero_point  int32 [ceil(N/8), G]    row 8r+i in bits 4i..4i+3 of word r (asymmetric only)

compressed-tensors stores W_q − 8 as int8 and adds the 8 back when packing, so each stored
nibble is the unsigned code itself.

Kernel::

  qweight  int32 [S, N, 16]  S = ceil(K/128) spans of 128 columns; each weight row n has 16 words
                             per span (64 contiguous bytes), zero-padded past K. Word r = 2u + h,
                             nibble c = b + 4e (u < 8, h < 2, b < 4, e < 2) holds column
                             s·128 + 16·(b + 4h) + 2u + e of row n.
  scales   [G, N]            activation dtype (transposed: a tile of rows reads contiguously)
  zeros    uint8 [G, N]      asymmetric only; symmetric grids use zero = 8
  qparams  int32 [G, N]      what the kernel reads (`pack_qparams`): the scale's 16 bits in the
                             low half, the zero point in the high half; one 4-byte load per row
                             and group, which Triton copies ahead asynchronously with the words

Why this order: the kernel's dequantization turns one word into four fp16x2 registers with one
LOP3 each (mask nibbles c and c + 4, OR in the exponent of 1024.0). The two halves of such a
register are columns 2u and 2u + 1 of one 16-column slice: two neighbouring K positions of one
weight row, exactly the pair a tensor-core operand register holds. Words 2u and 2u + 1 (the
two a thread holds side by side) cover the eight 16-column slices b + 4h of the span, so each
slice i of the span is one K=16 step whose operand registers come straight out of the LOP3s.
"""
from __future__ import annotations

import torch

SPAN = 128  # columns per interleave span
SPAN_WORDS = SPAN // 8
_SHIFTS = tuple(4 * i for i in range(8))


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 holding unsigned 32-bit patterns -> int32 with the same bits."""
    return (words - ((words >> 31) & 1) * (1 << 32)).to(torch.int32)


def _shifts(device: torch.device) -> torch.Tensor:
    return torch.tensor(_SHIFTS, dtype=torch.int32, device=device)


def unpack_int4_cols(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Shapes: int32 [R, C] with column 8c+i in nibble i of word c -> uint8 [R, cols]."""
    assert packed.dtype == torch.int32 and packed.dim() == 2 and cols <= packed.shape[1] * 8
    nib = (packed.unsqueeze(-1) >> _shifts(packed.device)) & 0xF  # [R, C, 8]
    return nib.reshape(packed.shape[0], -1)[:, :cols].to(torch.uint8)


def pack_int4_cols(W_q: torch.Tensor) -> torch.Tensor:
    """Inverse of `unpack_int4_cols`: uint8 [R, cols] -> int32 [R, ceil(cols/8)] (zero-padded)."""
    R, cols = W_q.shape
    q = torch.nn.functional.pad(W_q.to(torch.int64), (0, -cols % 8)).reshape(R, -1, 8)
    return _to_int32((q << torch.tensor(_SHIFTS, device=W_q.device)).sum(-1))


def unpack_checkpoint(weight_packed: torch.Tensor, shape: tuple[int, int],
                      zero_packed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """compressed-tensors tensors -> (W_q uint8 [N, K], zero uint8 [N, G] or None)."""
    N, K = shape
    if tuple(weight_packed.shape) != (N, -(-K // 8)):
        raise ValueError(f"weight_packed has shape {tuple(weight_packed.shape)}, expected {(N, -(-K // 8))}")
    W_q = unpack_int4_cols(weight_packed, K)
    zero = None if zero_packed is None else unpack_int4_cols(zero_packed.t().contiguous(), N).t().contiguous()
    return W_q, zero


def pack_kernel(W_q: torch.Tensor) -> torch.Tensor:
    """Codes uint8 [N, K] -> qweight int32 [ceil(K/128), N, 16] in the kernel layout (see above)."""
    N, K = W_q.shape
    q = torch.nn.functional.pad(W_q.to(torch.int64), (0, -K % SPAN))
    # column 16·(b + 4h) + 2u + e of a span -> [n, s, h, b, u, e]; words (u, h), nibbles (e, b)
    q = q.reshape(N, -1, 2, 4, 8, 2).permute(0, 1, 4, 2, 5, 3).reshape(N, -1, SPAN_WORDS, 8)
    words = _to_int32((q << torch.tensor(_SHIFTS, device=W_q.device)).sum(-1))  # [N, S, 16]
    return words.transpose(0, 1).contiguous()


def unpack_kernel(qweight: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of `pack_kernel`: int32 [S, N, 16] -> uint8 [N, in_features]."""
    S, N, _ = qweight.shape
    nib = (qweight.transpose(0, 1).unsqueeze(-1) >> _shifts(qweight.device)) & 0xF  # [N, S, 16 (u, h), 8 (e, b)]
    nib = nib.reshape(N, S, 8, 2, 2, 4).permute(0, 1, 3, 5, 2, 4)  # [n, s, h, b, u, e]
    return nib.reshape(N, -1)[:, :in_features].to(torch.uint8)


def pack_qparams(scales: torch.Tensor, zeros: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """scales [G, N] (rounded to the 16-bit `dtype`), zeros uint8 [G, N] or None (= 8) -> int32 [G, N]."""
    bits = scales.to(dtype).contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
    z = 8 if zeros is None else zeros.to(torch.int32)
    return (bits | (z << 16)).contiguous()


def kernel_group_ok(group_size: int, in_features: int) -> bool:
    """Whether the kernels handle this grouping: every 16-column slice must lie in one group."""
    return group_size % 16 == 0 and in_features % group_size == 0
