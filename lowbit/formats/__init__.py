"""Format registry: a new format is one file in this package plus one line in ``FORMATS``."""
from __future__ import annotations

import torch

from ..errors import LowbitError
from ..spec import QuantScheme
from .base import Format, QParams, QuantizedTensor
from .int import IntFormat

FORMATS: dict[str, type[Format]] = {
    IntFormat.name: IntFormat,
}


def make_format(scheme: QuantScheme, scale_dtype: torch.dtype = torch.float32) -> Format:
    """The grid for `scheme`, storing scales in `scale_dtype`."""
    try:
        cls = FORMATS[scheme.format]
    except KeyError:
        raise LowbitError(
            f"unknown format {scheme.format!r}; available: {', '.join(sorted(FORMATS))}"
        ) from None
    return cls(bits=scheme.bits, group_size=scheme.group_size, sym=scheme.sym, scale_dtype=scale_dtype)


__all__ = ["FORMATS", "Format", "QParams", "QuantizedTensor", "make_format"]
