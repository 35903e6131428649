"""Format registry: a new format is one file in this package plus one line in ``FORMATS``."""
from __future__ import annotations

import torch

from ..errors import LowbitError
from ..spec import QuantScheme
from .base import Format, QParams, QuantizedTensor
from .fp8 import FP8E4M3Format, FP8E5M2Format
from .gguf import GGUF_FORMATS
from .int import IntFormat
from .mxfp4 import MXFP4Format
from .nf4 import NF4Format
from .nvfp4 import NVFP4Format

FORMATS: dict[str, type[Format]] = {
    IntFormat.name: IntFormat,
    NF4Format.name: NF4Format,
    FP8E4M3Format.name: FP8E4M3Format,
    FP8E5M2Format.name: FP8E5M2Format,
    MXFP4Format.name: MXFP4Format,
    NVFP4Format.name: NVFP4Format,
    **GGUF_FORMATS,  # "gguf:q4_0" … "gguf:q6_k"
}


def make_format(scheme: QuantScheme, scale_dtype: torch.dtype = torch.float32) -> Format:
    """The grid for `scheme`, storing scales in `scale_dtype`."""
    try:
        cls = FORMATS[scheme.format]
    except KeyError:
        raise LowbitError(
            f"unknown format {scheme.format!r}; available: {', '.join(sorted(FORMATS))}"
        ) from None
    return cls.from_scheme(scheme, scale_dtype)


__all__ = ["FORMATS", "Format", "QParams", "QuantizedTensor", "make_format"]
