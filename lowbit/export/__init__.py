"""Exporter registry: a new output format is one file here plus one line in ``EXPORTERS``.

An exporter module has ``export(ctx, out_dir)`` and may have ``unsupported(fmt) -> str | None``,
the reason it cannot store a weight format: `check_exportable` asks it before any quantizing, and
the exporter `get_exporter` returns asks it again before writing, so modules never check it themselves."""
from __future__ import annotations

from types import ModuleType
from typing import Callable

from ..errors import LowbitError
from . import autoawq, compressed_tensors, fake, gguf, gptq
from .writer import ExportContext

EXPORTERS: dict[str, ModuleType] = {
    "compressed-tensors": compressed_tensors,
    "fake": fake,
    "gptq": gptq,
    "autoawq": autoawq,
    "gguf": gguf,
}


def _module(name: str) -> ModuleType:
    try:
        return EXPORTERS[name]
    except KeyError:
        raise LowbitError(f"unknown export format {name!r}; available: {', '.join(EXPORTERS)}") from None


def get_exporter(name: str) -> Callable:
    """Exporter `name` as export(ctx, out_dir), which refuses a weight format it cannot store."""
    module = _module(name)

    def export(ctx: ExportContext, out_dir) -> None:
        check_exportable(name, ctx.fmt)
        module.export(ctx, out_dir)

    return export


def check_exportable(name: str, fmt) -> None:
    """Raise the exporter's one-line reason if it cannot store weight format `fmt` (a bad name too)."""
    reason = getattr(_module(name), "unsupported", lambda _fmt: None)(fmt)
    if reason:
        raise LowbitError(reason)


__all__ = ["EXPORTERS", "ExportContext", "check_exportable", "get_exporter"]
