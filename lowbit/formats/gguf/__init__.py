"""GGUF block types as lowbit formats (``gguf:q4_0`` … ``gguf:q6_k``), Q4_X and imatrix I/O.

One small class per block type (legacy.py: 32-weight blocks, kquants.py: 256-weight
super-blocks), sizes from one table (table.py), llama.cpp's searches vectorised in search.py.
"""
from __future__ import annotations

from .base import GGUFFormat, GGUFShapeError
from .imatrix import Imatrix, ImatrixEntry, read_dat, read_gguf, read_imatrix, write_dat, write_gguf
from .kquants import Q2_K, Q3_K, Q4_K, Q5_K, Q6_K
from .legacy import Q4_0, Q4_1, Q5_0, Q5_1, Q8_0
from .q4x import Fidelity, q4x_bytes, q4x_fidelity, q4x_quantized
from .table import BLOCK_TYPES, QK_K, BlockType, fallback_type

GGUF_FORMATS: dict[str, type[GGUFFormat]] = {c.name: c for c in (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0,
                                                              Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)}

__all__ = ["BLOCK_TYPES", "GGUF_FORMATS", "QK_K", "BlockType", "Fidelity", "GGUFFormat", "GGUFShapeError",
           "Imatrix", "ImatrixEntry", "Q2_K", "Q3_K", "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K",
           "Q8_0", "fallback_type", "q4x_bytes", "q4x_fidelity", "q4x_quantized", "read_dat", "read_gguf",
           "read_imatrix", "write_dat", "write_gguf"]
