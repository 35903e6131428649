"""Fake-quantized checkpoints: dequantized weights in the source dtype, loadable anywhere."""
from __future__ import annotations

from pathlib import Path

from ..formats import QuantizedTensor
from .writer import ExportContext, output_tensors, save_config, write_shards


def export(ctx: ExportContext, out_dir: Path) -> None:
    def convert_linear(path: str, qt: QuantizedTensor):
        return {f"{path}.weight": qt.dequantize(ctx.dtype)}

    write_shards(output_tensors(ctx, convert_linear), out_dir)
    if ctx.lm_head_quantized:
        ctx.config.tie_word_embeddings = False
    save_config(ctx.config, out_dir)
