"""GGUF block types: the one table of block sizes, byte sizes and GGML type ids.

  type   ggml id  weights/block  bytes/block  weights per (effective) scale
"""
from __future__ import annotations

from dataclasses import dataclass

QK_K = 256  # weights per K-quant super-block


@dataclass(frozen=True)
class BlockType:
    name: str        # lowbit's spelling, e.g. "q4_k" (registered as "gguf:q4_k")
    ggml_type: int   # GGMLQuantizationType value in a GGUF file
    block_size: int  # weights per block
    type_size: int   # bytes per block
    sub_block: int   # weights sharing one effective scale (the grid's group length)

    @property
    def bits_per_weight(self) -> float:
        return self.type_size * 8 / self.block_size


BLOCK_TYPES: dict[str, BlockType] = {t.name: t for t in (
    BlockType("q4_0", 2, 32, 18, 32),
    BlockType("q4_1", 3, 32, 20, 32),
    BlockType("q5_0", 6, 32, 22, 32),
    BlockType("q5_1", 7, 32, 24, 32),
    BlockType("q8_0", 8, 32, 34, 32),
    BlockType("q2_k", 10, QK_K, 84, 16),
    BlockType("q3_k", 11, QK_K, 110, 16),
    BlockType("q4_k", 12, QK_K, 144, 32),
    BlockType("q5_k", 13, QK_K, 176, 32),
    BlockType("q6_k", 14, QK_K, 210, 16),
)}

# llama-quantize's per-tensor fallback when a row is not a multiple of 256 (tensor_type_fallback in
# src/llama-quant.cpp of the llama.cpp vendored by llama-cpp-python 0.3.36; older releases sent
# Q2_K/Q3_K to IQ4_NL).
_K_FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}


def fallback_type(type_name: str, row_len: int) -> str:
    """The block type llama-quantize writes for a tensor whose rows have `row_len` weights.

    `type_name` itself when it fits; for K-quants on rows that are not a multiple of 256 the
    documented fallback (Q4_K→Q5_0, Q5_K→Q5_1, Q6_K→Q8_0, Q2_K/Q3_K→Q4_0); "f16" when even that
    block does not divide the row.
    """
    t = type_name.lower()
    if t not in BLOCK_TYPES:
        raise KeyError(f"unknown GGUF block type {type_name!r}; known: {', '.join(BLOCK_TYPES)}")
    if row_len % BLOCK_TYPES[t].block_size == 0:
        return t
    fb = _K_FALLBACK.get(t)
    if fb is None:
        return "f16"
    return fb if row_len % BLOCK_TYPES[fb].block_size == 0 else "f16"
