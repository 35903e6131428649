"""Bit packing shared by the codecs: pure integer tensor reshuffles, no format knowledge.

Shapes: codes [rows, cols] of small unsigned integers; packed tensors as each function says.
"""
from __future__ import annotations

import torch


def pack_nibbles(codes: torch.Tensor, high_first: bool = False) -> torch.Tensor:
    """[..., 2k] codes in 0..15 -> [..., k] uint8, two per byte.

    high_first=False puts element 2i in the low nibble (OCP MX, compressed-tensors FP4);
    high_first=True puts it in the high nibble (bitsandbytes NF4).
    """
    c = codes.to(torch.uint8)
    a, b = c[..., 0::2], c[..., 1::2]
    return (a << 4) | b if high_first else a | (b << 4)


def unpack_nibbles(packed: torch.Tensor, high_first: bool = False) -> torch.Tensor:
    """Exact inverse of `pack_nibbles`: [..., k] uint8 -> [..., 2k] uint8."""
    p = packed.to(torch.uint8)
    lo, hi = p & 0x0F, p >> 4
    first, second = (hi, lo) if high_first else (lo, hi)
    return torch.stack([first, second], dim=-1).flatten(-2)


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Dense little-endian bitstream of each row: [rows, cols] codes in [0, 2^bits) -> int32
    [rows, ceil(cols·bits/32)]. Element j occupies bits [j·bits, (j+1)·bits) of the row, words
    split an element where they must (the layout of compressed-tensors' pack_to_int32).
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"pack_int32 packs 1..8-bit codes, got {bits}")
    rows, cols = codes.shape
    n_words = -(-cols * bits // 32)
    pad = -cols % 32
    c = torch.nn.functional.pad(codes.to(torch.int64), (0, pad))
    shifts = torch.arange(bits, dtype=torch.int64, device=codes.device)
    bitstream = ((c.unsqueeze(-1) >> shifts) & 1).reshape(rows, -1, 32)  # [rows, words, 32 bits]
    weights = torch.ones(32, dtype=torch.int64, device=codes.device) << torch.arange(32, device=codes.device)
    words = (bitstream * weights).sum(-1)[:, :n_words]                   # [rows, n_words] in [0, 2^32)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_int32(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Exact inverse of `pack_int32`: int32 [rows, words] -> uint8 [rows, cols]."""
    rows = packed.shape[0]
    words = packed.to(torch.int64) & 0xFFFFFFFF
    bit_idx = torch.arange(32, device=packed.device)
    bitstream = ((words.unsqueeze(-1) >> bit_idx) & 1).reshape(rows, -1)[:, : cols * bits]
    bitstream = bitstream.reshape(rows, cols, bits)
    weights = torch.ones(bits, dtype=torch.int64, device=packed.device) << torch.arange(bits, device=packed.device)
    return (bitstream * weights).sum(-1).to(torch.uint8)
