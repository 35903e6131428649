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

from .formats import Format, QParams, QuantizedTensor

_SUFFIXES = (".W_q", ".scale", ".zero")


def save_layer(path: Path, quantized: dict[str, QuantizedTensor], updates: dict[str, torch.Tensor],
               stats: dict[str, Any]) -> None:
    """Write one layer's plan atomically; keys are full module paths."""
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
    save_file(tensors, tmp, metadata={"stats": json.dumps(stats, default=float)})
    os.replace(tmp, path)


class Plan:
    """Read access to all layer plans in a directory."""

    def __init__(self, layers_dir: Path, fmt: Format):
        self.fmt = fmt
        self._where: dict[str, Path] = {}
        self._updates: dict[str, Path] = {}
        self.stats: dict[str, Any] = {}
        for f in sorted(Path(layers_dir).glob("*.safetensors")):
            with safe_open(f, framework="pt") as h:
                self.stats[f.stem] = json.loads(h.metadata().get("stats", "{}"))
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

    def quantized(self, path: str) -> QuantizedTensor:
        with safe_open(self._where[path], framework="pt") as h:
            W_q, scale, zero = (h.get_tensor(path + s) for s in _SUFFIXES)
            g_idx = _g_idx(h, path)
        return QuantizedTensor(W_q, QParams(scale, zero), self.fmt, g_idx)

    def update(self, name: str) -> torch.Tensor:
        with safe_open(self._updates[name], framework="pt") as h:
            return h.get_tensor(f"update:{name}")

    def items(self) -> Iterator[tuple[str, QuantizedTensor]]:
        for p in self._where:
            yield p, self.quantized(p)


def load_layer(path: Path, fmt: Format) -> tuple[dict[str, QuantizedTensor], dict[str, torch.Tensor]]:
    """Read back one layer's plan (for --resume)."""
    quantized, updates = {}, {}
    with safe_open(path, framework="pt") as h:
        for k in h.keys():
            if k.startswith("update:"):
                updates[k[len("update:"):]] = h.get_tensor(k)
            elif k.endswith(".W_q"):
                p = k[: -len(".W_q")]
                quantized[p] = QuantizedTensor(h.get_tensor(k), QParams(h.get_tensor(p + ".scale"),
                                                                        h.get_tensor(p + ".zero")), fmt,
                                               _g_idx(h, p))
    return quantized, updates


def _g_idx(h, path: str) -> torch.Tensor | None:
    """The optional act-order group index of one linear (absent for contiguous groups)."""
    return h.get_tensor(path + ".g_idx") if path + ".g_idx" in h.keys() else None
