"""INT4 weight layouts: the checkpoint's, and the one the Triton kernels read.

Pure tensor code (any device), no Triton. Names: ``W_q`` unsigned codes uint8 [N, K] (N = out
features, K = in features), ``zero`` integer zero points [N, G], ``scale`` [N, G], G = K / group_size.

Checkpoint (compressed-tensors ``pack-quantized``, 4 bits)::

  weight_packed      int32 [N, K/8]          column 8c+i in bits 4i..4i+3 of word c (low bits first)
  weight_zero_point  int32 [ceil(N/8), G]    row 8r+i in bits 4i..4i+3 of word r (asymmetric only)

compressed-tensors stores W_q − 8 as int8 and adds the 8 back when packing, so each stored
nibble is the unsigned code itself.

Kernel::

  qweight  int32 [S·16, N]   S = ceil(K/128) spans of 128 columns, 16 word rows each: word
                             (16·s + j, n) holds, in nibble i, column s·128 + 16·i + j of weight
                             row n (zero-padded past K). Words are K-major: rows are contiguous
  scales   [G, N]            activation dtype (transposed: a tile of rows reads contiguously)
  zeros    uint8 [G, N]      asymmetric only; symmetric grids use zero = 8

The span interleave makes nibble i of 16 words one run of 16 consecutive columns: one group (any
group size that is a multiple of 16), one contiguous slice of X, one K=16 tensor-core step.
K-major words put 4 weight rows at the same columns in each 128-bit vector, so a thread reuses
every X value it loads for 4 rows, and scales ([G, N]) come in the same row order.
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
    """Codes uint8 [N, K] -> qweight int32 [ceil(K/128)·16, N] in the span-interleaved layout."""
    N, K = W_q.shape
    q = torch.nn.functional.pad(W_q.to(torch.int64), (0, -K % SPAN))
    q = q.reshape(N, -1, 8, SPAN_WORDS)  # [n, span, nibble i, word j]: column span·128 + 16i + j
    shifts = torch.tensor(_SHIFTS, device=W_q.device).view(1, 1, 8, 1)
    return _to_int32((q << shifts).sum(2)).reshape(N, -1).t().contiguous()


def unpack_kernel(qweight: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of `pack_kernel`: int32 [S·16, N] -> uint8 [N, in_features]."""
    N = qweight.shape[1]
    w = qweight.t().reshape(N, -1, 1, SPAN_WORDS)  # [n, span, 1, word j]
    nib = (w >> _shifts(qweight.device).view(1, 1, 8, 1)) & 0xF  # [n, span, nibble i, word j]
    return nib.reshape(N, -1)[:, :in_features].to(torch.uint8)


def kernel_group_ok(group_size: int, in_features: int) -> bool:
    """Whether the kernels handle this grouping: every 16-column slice must lie in one group."""
    return group_size % 16 == 0 and in_features % group_size == 0
