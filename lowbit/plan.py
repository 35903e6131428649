"""The quantization plan on disk: one safetensors file per layer with codes, grid parameters
and updated parameters. Written as each layer finishes (so a killed run resumes), read by the
exporters, which never need the whole model in memory.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import LowbitError
from .formats import Format, QParams, QuantizedTensor
from .formats.map import FormatMap

_SUFFIXES = (".W_q", ".scale", ".zero")


def save_layer(path: Path, quantized: dict[str, QuantizedTensor], updates: dict[str, torch.Tensor],
               stats: dict[str, Any]) -> None:
    """Write one layer's plan atomically; keys are full module paths. Each tensor's format name is
    recorded (metadata "formats"), so a plan read back under another recipe fails loudly."""
    tensors: dict[str, torch.Tensor] = {}
    for name, qt in quantized.items():
        tensors[f"{name}.W_q"] = qt.W_q.contiguous().cpu()
        tensors[f"{name}.scale"] = qt.qparams.scale.float().contiguous().cpu()
        tensors[f"{name}.zero"] = qt.qparams.zero.float().contiguous().cpu()
        if qt.g_idx is not None:
            tensors[f"{name}.g_idx"] = qt.g_idx.to(torch.int32).contiguous().cpu()
    for name, t in updates.items():
        tensors[f"update:{name}"] = t.contiguous().cpu()
    tmp = path.with_name(path.name + ".tmp")
    formats = {name: qt.format.name for name, qt in quantized.items()}
    save_file(tensors, tmp, metadata={"stats": json.dumps(stats, default=float), "formats": json.dumps(formats)})
    os.replace(tmp, path)


class Plan:
    """Read access to all layer plans in a directory; `formats` says which format each tensor is on."""

    def __init__(self, layers_dir: Path, formats: Format | FormatMap):
        self.formats = FormatMap.of(formats)
        self.fmt = self.formats.default
        self._where: dict[str, Path] = {}
        self._updates: dict[str, Path] = {}
        self._recorded: dict[str, str] = {}
        self.stats: dict[str, Any] = {}
        for f in sorted(Path(layers_dir).glob("*.safetensors")):
            with safe_open(f, framework="pt") as h:
                self.stats[f.stem] = json.loads(h.metadata().get("stats", "{}"))
                self._recorded.update(json.loads(h.metadata().get("formats", "{}")))
                for k in h.keys():
                    if k.startswith("update:"):
                        self._updates[k[len("update:"):]] = f
                    elif k.endswith(".W_q"):
                        self._where[k[: -len(".W_q")]] = f

    @property
    def quantized_paths(self) -> list[str]:
        return list(self._where)

    @property
    def updated_names(self) -> list[str]:
        return list(self._updates)

    def format_name(self, path: str) -> str:
        """The recorded format name of a quantized tensor (the default's for plans that predate it)."""
        return self._recorded.get(path, self.fmt.name)

    def quantized(self, path: str) -> QuantizedTensor:
        with safe_open(self._where[path], framework="pt") as h:
            W_q, scale, zero = (h.get_tensor(path + s) for s in _SUFFIXES)
            g_idx = _g_idx(h, path)
        return QuantizedTensor(W_q, QParams(scale, zero), _format(self.formats, path, W_q, self._recorded), g_idx)

    def update(self, name: str) -> torch.Tensor:
        with safe_open(self._updates[name], framework="pt") as h:
            return h.get_tensor(f"update:{name}")

    def items(self) -> Iterator[tuple[str, QuantizedTensor]]:
        for p in self._where:
            yield p, self.quantized(p)


def load_layer(path: Path, formats: Format | FormatMap) -> tuple[dict[str, QuantizedTensor], dict[str, torch.Tensor]]:
    """Read back one layer's plan (for --resume)."""
    formats = FormatMap.of(formats)
    quantized, updates = {}, {}
    with safe_open(path, framework="pt") as h:
        recorded = json.loads(h.metadata().get("formats", "{}"))
        for k in h.keys():
            if k.startswith("update:"):
                updates[k[len("update:"):]] = h.get_tensor(k)
            elif k.endswith(".W_q"):
                p = k[: -len(".W_q")]
                W_q = h.get_tensor(k)
                quantized[p] = QuantizedTensor(W_q, QParams(h.get_tensor(p + ".scale"), h.get_tensor(p + ".zero")),
                                               _format(formats, p, W_q, recorded), _g_idx(h, p))
    return quantized, updates


def _format(formats: FormatMap, path: str, W_q: torch.Tensor, recorded: dict[str, str]) -> Format:
    """The format of tensor `path` under the current recipe, which must be the one it was planned on."""
    fmt = formats(path, tuple(W_q.shape))
    if path in recorded and recorded[path] != fmt.name:
        raise LowbitError(f"{path} was planned on {recorded[path]} but this recipe gives {fmt.name}; "
                          "the plan belongs to another recipe")
    return fmt


def _g_idx(h, path: str) -> torch.Tensor | None:
    """The optional act-order group index of one linear (absent for contiguous groups)."""
    return h.get_tensor(path + ".g_idx") if path + ".g_idx" in h.keys() else None
