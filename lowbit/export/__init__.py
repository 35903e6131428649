"""Exporter registry: a new output format is one file here plus one line in ``EXPORTERS``."""
from __future__ import annotations

from typing import Callable

from ..errors import LowbitError
from . import autoawq, compressed_tensors, fake, gguf, gptq
from .writer import ExportContext

EXPORTERS: dict[str, Callable] = {
    "compressed-tensors": compressed_tensors.export,
    "fake": fake.export,
    "gptq": gptq.export,
    "autoawq": autoawq.export,
    "gguf": gguf.export,
}


def get_exporter(name: str) -> Callable:
    try:
        return EXPORTERS[name]
    except KeyError:
        raise LowbitError(f"unknown export format {name!r}; available: {', '.join(EXPORTERS)}") from None


__all__ = ["EXPORTERS", "ExportContext", "get_exporter"]
