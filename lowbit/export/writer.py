"""Shared export plumbing: walk the source checkpoint, swap in the plan, write shards."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

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


_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


class _SafetensorsStream:
    """One safetensors file written a tensor at a time: payloads go to a side file as they come,
    the header is written at the end, so memory never holds more than one tensor."""

    def __init__(self, path: Path):
        self.path = path
        self.data_path = path.with_name(path.name + ".data")
        self.data = open(self.data_path, "wb")
        self.header: dict[str, dict] = {}
        self.nbytes = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        t = t.detach().cpu().contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
        self.data.write(memoryview(raw))
        end = self.nbytes + t.numel() * t.element_size()
        self.header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [self.nbytes, end]}
        self.nbytes = end

    def close(self) -> None:
        self.data.close()
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.header}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        with open(self.path, "wb") as out, open(self.data_path, "rb") as data:
            out.write(len(header).to_bytes(8, "little"))
            out.write(header)
            shutil.copyfileobj(data, out, 1 << 24)
        self.data_path.unlink()


def write_shards(tensors: Iterator[tuple[str, torch.Tensor]], out_dir: Path,
                 max_bytes: int = MAX_SHARD_BYTES) -> list[Path]:
    """Stream tensors into safetensors shards of at most `max_bytes`, with an index if sharded."""
    shards: list[_SafetensorsStream] = []
    for name, t in tensors:
        if not shards or (shards[-1].nbytes and shards[-1].nbytes + t.numel() * t.element_size() > max_bytes):
            if shards:
                shards[-1].close()
            shards.append(_SafetensorsStream(out_dir / f"shard-{len(shards):05d}.tmp"))
        shards[-1].add(name, t)
    if not shards:
        shards.append(_SafetensorsStream(out_dir / "shard-00000.tmp"))
    shards[-1].close()

    if len(shards) == 1:
        final = [out_dir / "model.safetensors"]
    else:
        final = [out_dir / f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for shard, dst in zip(shards, final):
        shard.path.rename(dst)
    if len(final) > 1:
        weight_map = {k: dst.name for shard, dst in zip(shards, final) for k in shard.header}
        total = sum(f.stat().st_size for f in final)
        (out_dir / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return final


def save_config(config, out_dir: Path) -> None:
    config.save_pretrained(out_dir)
