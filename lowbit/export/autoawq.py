"""AutoAWQ GEMM checkpoints (``quant_method: awq, version: gemm``), as AutoAWQ writes them and
transformers / vLLM load them.

On-disk layout per quantized linear (out × in, group length g, 4-bit codes, W_r = (q − z) · s):

  qweight   int32   [in, out/8]    codes of Wᵀ, 8 output channels per word
  qzeros    int32   [in/g, out/8]  zero points, packed like qweight
  scales    float16 [in/g, out]

Within each word the 4-bit fields, lowest bits first, hold output channels 0, 2, 4, 6, 1, 3, 5, 7
of its block of eight (AutoAWQ's order, which its GEMM kernel dequantizes in pairs).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..errors import LowbitError
from ..formats import QuantizedTensor
from .writer import ExportContext, output_tensors, save_config, write_shards

log = logging.getLogger(__name__)

BITS = 4
PACK = 32 // BITS
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # field i of a word holds output channel AWQ_ORDER[i]


def layout(out_features: int, in_features: int, group_len: int) -> dict[str, tuple]:
    """The tensors one linear becomes: name -> (shape, dtype)."""
    return {
        "qweight": ((in_features, out_features // PACK), torch.int32),
        "qzeros": ((in_features // group_len, out_features // PACK), torch.int32),
        "scales": ((in_features // group_len, out_features), torch.float16),
    }


def pack_columns(q: torch.Tensor) -> torch.Tensor:
    """4-bit values [rows, cols] -> int32 [rows, cols/8] in AWQ's field order."""
    rows, cols = q.shape
    fields = q.to(torch.int64).reshape(rows, cols // PACK, PACK)[:, :, list(AWQ_ORDER)]
    words = (fields << torch.arange(0, 32, BITS, dtype=torch.int64)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # the same 32 bits, signed


def convert(qt: QuantizedTensor) -> dict[str, torch.Tensor]:
    """One linear's codes and grid as AutoAWQ GEMM tensors (see the module docstring)."""
    zero = qt.qparams.zero.float()
    if not torch.equal(zero, zero.round().clamp(0, 2**BITS - 1)):
        raise LowbitError("AutoAWQ zero points must be integers in [0, 15]")
    return {
        "qweight": pack_columns(qt.W_q.T),
        "qzeros": pack_columns(zero.to(torch.uint8).T),
        "scales": qt.qparams.scale.T.to(torch.float16).contiguous(),
    }


def unsupported(fmt) -> str | None:
    """Why this exporter cannot store `fmt` (checked before quantizing), or None."""
    if fmt.name != "int" or fmt.bits != BITS:
        return (f"AutoAWQ GEMM holds 4-bit int weights, not {fmt.name} {getattr(fmt, 'bits', '?')}-bit; "
                "use --bits 4 --weight-format int, or --format compressed-tensors")
    return None


def _check(ctx: ExportContext) -> None:
    """What `unsupported` cannot tell from the format alone: the lm_head and this plan's shapes."""
    if ctx.lm_head_quantized:
        raise LowbitError("AutoAWQ checkpoints keep lm_head in float; drop --quantize-lm-head or use "
                          "--format compressed-tensors")
    for path, qt in ctx.plan.items():
        out_f, in_f = qt.W_q.shape
        if qt.g_idx is not None:
            raise LowbitError(f"{path}: AutoAWQ has no act-order group index; quantize without act-order")
        if out_f % PACK:
            raise LowbitError(f"{path}: out_features {out_f} is not a multiple of {PACK}, which AutoAWQ packs by")


def quantization_config(ctx: ExportContext) -> dict:
    """transformers' AwqConfig fields; layers left unquantized (--layers) stay float by name."""
    quantized_layers = {p[len(ctx.family.layers) + 1:].split(".")[0] for p in ctx.plan.quantized_paths
                        if p.startswith(ctx.family.layers + ".")}
    n = getattr(ctx.config, "num_hidden_layers", 0)
    skip = [ctx.family.lm_head] + [f"{ctx.family.layers}.{i}" for i in range(n) if str(i) not in quantized_layers]
    return {"quant_method": "awq", "version": "gemm", "bits": BITS, "group_size": ctx.fmt.group_size or -1,
            "zero_point": True, "modules_to_not_convert": skip}


def export(ctx: ExportContext, out_dir: Path) -> None:
    _check(ctx)
    if ctx.dtype not in (torch.float16, torch.bfloat16):
        log.warning("AutoAWQ stores scales in float16; this %s model's scales are rounded to it", ctx.dtype)

    def convert_linear(path: str, qt: QuantizedTensor) -> dict[str, torch.Tensor]:
        return {f"{path}.{k}": v for k, v in convert(qt).items()}

    write_shards(output_tensors(ctx, convert_linear), out_dir)
    ctx.config.quantization_config = quantization_config(ctx)
    save_config(ctx.config, out_dir)
