"""Shared export plumbing: walk the source checkpoint, swap in the plan, write shards."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors.torch import save_file

from ..formats import Format, QuantizedTensor
from ..model.arch import Family
from ..model.source import WeightStore
from ..plan import Plan

MAX_SHARD_BYTES = 2 * 1024**3


@dataclass
class ExportContext:
    """Everything an exporter reads: the untouched source, the plan, and how to interpret both."""

    store: WeightStore
    config: object  # transformers PretrainedConfig (a copy the exporter may edit)
    family: Family
    plan: Plan
    fmt: Format
    dtype: torch.dtype  # the source checkpoint's float dtype

    @property
    def lm_head_quantized(self) -> bool:
        return self.family.lm_head in self.plan.quantized_paths


Converter = Callable[[str, QuantizedTensor], dict[str, torch.Tensor]]


def output_tensors(ctx: ExportContext, convert: Converter) -> Iterator[tuple[str, torch.Tensor]]:
    """Source tensors in order, with quantized linears replaced by `convert`'s tensors."""
    quantized = set(ctx.plan.quantized_paths)
    updated = set(ctx.plan.updated_names)
    for name in ctx.store.keys():
        path = name.removesuffix(".weight")
        if name.endswith(".weight") and path in quantized:
            yield from convert(path, ctx.plan.quantized(path)).items()
            quantized.discard(path)
        elif name in updated:
            yield name, ctx.plan.update(name).to(ctx.dtype)
        else:
            yield name, ctx.store.get(name)
    for path in sorted(quantized):  # e.g. a quantized lm_head that was tied to the embeddings
        yield from convert(path, ctx.plan.quantized(path)).items()


def write_shards(tensors: Iterator[tuple[str, torch.Tensor]], out_dir: Path,
                 max_bytes: int = MAX_SHARD_BYTES) -> list[Path]:
    """Stream tensors into safetensors shards of at most `max_bytes`, with an index if sharded."""
    shards: list[dict[str, torch.Tensor]] = []
    files: list[Path] = []
    current: dict[str, torch.Tensor] = {}
    size = 0

    def flush():
        nonlocal current, size
        if current:
            tmp = out_dir / f"shard-{len(files):05d}.tmp"
            save_file(current, tmp, metadata={"format": "pt"})
            files.append(tmp)
            shards.append({k: None for k in current})
        current, size = {}, 0

    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_bytes:
            flush()
        current[name] = t.contiguous()
        size += nbytes
    flush()

    if len(files) == 1:
        final = [out_dir / "model.safetensors"]
    else:
        final = [out_dir / f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    for tmp, dst in zip(files, final):
        tmp.rename(dst)
    if len(final) > 1:
        weight_map = {k: dst.name for keys, dst in zip(shards, final) for k in keys}
        total = sum(f.stat().st_size for f in final)
        (out_dir / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return final


def save_config(config, out_dir: Path) -> None:
    config.save_pretrained(out_dir)
