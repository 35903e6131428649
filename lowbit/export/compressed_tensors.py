"""compressed-tensors ``pack-quantized`` checkpoints: what vLLM serves and transformers loads.

On-disk layout per quantized linear (shapes for out × in, G groups, b bits):

  weight_packed       int32 [out, in·b/32]   signed codes (W_q − 2^(b−1)) packed along in
  weight_scale        float [out, G]         source dtype
  weight_zero_point   int32 [out·b/32, G]    signed zeros packed along out (asymmetric only)
  weight_shape        int64 [2]
"""
from __future__ import annotations

from pathlib import Path

import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

from ..errors import LowbitError
from ..formats import QuantizedTensor
from .writer import ExportContext, output_tensors, save_config, write_shards


def layout(out_features: int, in_features: int, bits: int, groups: int, sym: bool) -> dict[str, tuple]:
    """The tensors one linear becomes: name -> (shape, dtype)."""
    t = {
        "weight_packed": ((out_features, -(-in_features * bits // 32)), torch.int32),
        "weight_scale": ((out_features, groups), None),
        "weight_shape": ((2,), torch.int64),
    }
    if not sym:
        t["weight_zero_point"] = ((-(-out_features * bits // 32), groups), torch.int32)
    return t


def convert(qt: QuantizedTensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    fmt = qt.format
    offset = 1 << (fmt.bits - 1)
    out = {
        "weight_packed": pack_to_int32((qt.W_q.to(torch.int16) - offset).to(torch.int8), fmt.bits),
        "weight_scale": qt.qparams.scale.to(dtype),
        "weight_shape": torch.tensor(list(qt.W_q.shape), dtype=torch.int64),
    }
    if not fmt.sym:
        zero = (qt.qparams.zero.round().to(torch.int16) - offset).to(torch.int8)
        out["weight_zero_point"] = pack_to_int32(zero, fmt.bits, packed_dim=0)
    return out


def quantization_config(ctx: ExportContext) -> dict:
    fmt = ctx.fmt
    args = QuantizationArgs(
        num_bits=fmt.bits, type="int", symmetric=fmt.sym,
        strategy="group" if fmt.group_size else "channel",
        group_size=fmt.group_size or None, dynamic=False, observer="minmax")
    ignore = [] if ctx.lm_head_quantized else [ctx.family.lm_head]
    cfg = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
        format="pack-quantized", quantization_status="compressed", ignore=ignore)
    return cfg.model_dump(exclude_none=False)


def unsupported(fmt) -> str | None:
    """Why this exporter cannot store `fmt` (checked before quantizing), or None."""
    if fmt.name != "int":
        return (f"compressed-tensors pack-quantized holds int formats, not {fmt.name!r}; "
                "choose --format fake or another exporter")
    return None


def export(ctx: ExportContext, out_dir: Path) -> None:
    def convert_linear(path: str, qt: QuantizedTensor) -> dict[str, torch.Tensor]:
        if qt.g_idx is not None:
            raise LowbitError(f"{path}: act-order groups (g_idx) are not written by this exporter; "
                              "choose --format gptq or fake, or quantize without --true-act-order")
        return {f"{path}.{k}": v for k, v in convert(qt, ctx.dtype).items()}

    write_shards(output_tensors(ctx, convert_linear), out_dir)
    ctx.config.quantization_config = quantization_config(ctx)
    if ctx.lm_head_quantized:
        ctx.config.tie_word_embeddings = False
    save_config(ctx.config, out_dir)
