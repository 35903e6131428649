"""GPTQ v1 checkpoints (``checkpoint_format: gptq``): what AutoGPTQ wrote and GPTQModel, vLLM and
transformers load.

On-disk layout per quantized linear (shapes for out × in, G groups, b ∈ {2, 4, 8} bits, k = 32 / b):

  qweight   int32 [in / k, out]   codes W_q packed along in: element j of row r holds W_q[:, r·k + j]
                                  in bits [j·b, (j+1)·b) (lowest bits first)
  qzeros    int32 [G, out / k]    (zero − 1) mod 2^b, packed along out the same way (the v1 "−1")
  scales    fp16  [G, out]
  g_idx     int32 [in]            group of each input column (j // group_size unless act-order)
  bias      unchanged, when the linear has one

  W_r[o, i] = (W_q[o, i] − zero[o, g]) · scale[g, o] with g = g_idx[i] and zero = stored + 1.

Scales are written in float16 whatever the source dtype (bf16 scales of ordinary magnitude convert
exactly; fp32 ones are rounded, and the largest relative change is logged).

A zero point of 0 (an asymmetric group with no negative weight) has no v1 encoding every loader
reads alike: field-wise loaders (exllama-style kernels) add 1 to each field without wrapping (16
instead of 0), while GPTQModel subtracts 0x11..1 from the packed word as one integer (a 0 borrows
from its neighbour) and adds it back on load. lowbit never writes one: such a group is rewritten
exactly as codes + 1 with zero 1 when no code in it is 2^b − 1; otherwise export is refused.
Reading (`v1_zeros`) adds the word back, which decodes both lowbit's and GPTQModel's files exactly.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from ..errors import LowbitError
from ..formats import QuantizedTensor
from .writer import ExportContext, output_tensors, save_config, write_shards

log = logging.getLogger(__name__)

SUPPORTED_BITS = (2, 4, 8)


def layout(out_features: int, in_features: int, bits: int, groups: int) -> dict[str, tuple]:
    """The tensors one linear becomes: name -> (shape, dtype)."""
    k = 32 // bits
    return {
        "qweight": ((in_features // k, out_features), torch.int32),
        "qzeros": ((groups, out_features // k), torch.int32),
        "scales": ((groups, out_features), torch.float16),
        "g_idx": ((in_features,), torch.int32),
    }


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes [n, m] (each < 2^bits) -> int32 [n·bits/32, m], packed along dim 0, lowest bits first."""
    k = 32 // bits
    n, m = codes.shape
    assert n % k == 0, f"{n} rows do not pack {k} to an int32"
    c = codes.to(torch.int64).reshape(n // k, k, m)
    shifts = (torch.arange(k, dtype=torch.int64, device=c.device) * bits).view(1, k, 1)
    packed = (c << shifts).sum(dim=1)  # < 2^32, exact in int64
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_int32(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """`pack_int32` undone: int32 (or int64 words < 2^32) [n·bits/32, m] -> codes int64 [n, m]."""
    k = 32 // bits
    u = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = (torch.arange(k, dtype=torch.int64, device=u.device) * bits).view(1, k, 1)
    return ((u.unsqueeze(1) >> shifts) & ((1 << bits) - 1)).reshape(-1, u.shape[1])


def v1_zeros(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Zero points int64 [G, out] of v1 qzeros [G, out/k]: each word plus 0x11..1 (one 1 per field)
    as an integer, which equals a field-wise + 1 unless a field holds 2^b − 1 (a zero of 0 that
    GPTQModel's word-wise "− 1" wrote; see the module docstring)."""
    ones = sum(1 << (bits * j) for j in range(32 // bits))
    words = (qzeros.to(torch.int64) + ones) & 0xFFFFFFFF
    return unpack_int32(words.T, bits).T


def convert(qt: QuantizedTensor) -> dict[str, torch.Tensor]:
    """One linear's plan -> its GPTQ v1 tensors (see the module docstring)."""
    fmt = qt.format
    bits, qmax = fmt.bits, (1 << fmt.bits) - 1
    out_features, in_features = qt.W_q.shape
    gl = fmt.group_length(in_features)
    G = qt.qparams.scale.shape[1]
    g_idx = (torch.arange(in_features) // gl if qt.g_idx is None else qt.g_idx.cpu()).long()
    W_q = qt.W_q.cpu().to(torch.int64)
    zero = qt.qparams.zero.cpu().round().to(torch.int64)  # [out, G]

    unstorable = zero == 0
    if unstorable.any():
        group_max = torch.full((out_features, G), -1, dtype=torch.int64)
        group_max.scatter_reduce_(1, g_idx.expand(out_features, -1), W_q, reduce="amax")
        if (group_max[unstorable] >= qmax).any():
            raise LowbitError(
                f"GPTQ v1 cannot store a zero point of 0 in {int(unstorable.sum())} group(s) whose codes reach "
                f"{qmax}; quantize with --sym, or choose --format compressed-tensors")
        W_q = W_q + unstorable[:, g_idx].to(torch.int64)  # same W_r: (q + 1 − 1) · s
        zero = torch.where(unstorable, torch.ones_like(zero), zero)

    scales = qt.qparams.scale.cpu().float().T.contiguous()
    scales16 = scales.to(torch.float16)
    if not torch.isfinite(scales16).all():
        raise LowbitError("a scale overflows float16, which GPTQ checkpoints store; choose another --format")
    out = {
        "qweight": pack_int32(W_q.T.contiguous(), bits),
        "qzeros": pack_int32(((zero - 1) & qmax).contiguous(), bits).T.contiguous(),
        "scales": scales16,
        "g_idx": g_idx.to(torch.int32),
    }
    for name, (shape, dtype) in layout(out_features, in_features, bits, G).items():
        assert tuple(out[name].shape) == shape and out[name].dtype == dtype, (name, out[name].shape, shape)
    return out


def quantization_config(ctx: ExportContext, desc_act: bool) -> dict:
    fmt = ctx.fmt
    return {
        "quant_method": "gptq",
        "bits": fmt.bits,
        "group_size": fmt.group_size or -1,
        "desc_act": desc_act,
        "sym": fmt.sym,
        "checkpoint_format": "gptq",
        "lm_head": ctx.lm_head_quantized,
    }


def unsupported(fmt) -> str | None:
    """Why this exporter cannot store `fmt` (checked before quantizing), or None."""
    if fmt.name != "int":
        return f"GPTQ checkpoints hold int formats, not {fmt.name!r}; choose --format fake or another exporter"
    if fmt.bits not in SUPPORTED_BITS:
        return (f"the GPTQ exporter writes {', '.join(map(str, SUPPORTED_BITS))}-bit codes, "
                f"not {fmt.bits}; choose --bits 4 or --format compressed-tensors")
    return None


def _check(ctx: ExportContext) -> None:
    """What `unsupported` cannot tell from the format alone: the shapes and layers of this plan."""
    k = 32 // ctx.fmt.bits
    for path in ctx.plan.quantized_paths:
        out_features, in_features = ctx.store.shape(f"{path}.weight") if f"{path}.weight" in ctx.store \
            else ctx.plan.quantized(path).W_q.shape
        if in_features % k or out_features % k:
            raise LowbitError(f"{path}: GPTQ packs {k} codes per int32 along both dimensions; "
                              f"{out_features} x {in_features} does not divide")
    prefix = re.escape(ctx.family.layers) + r"\.(\d+)\."
    all_layers = {m.group(1) for m in map(re.compile(prefix).match, ctx.store.keys()) if m}
    done = {m.group(1) for m in map(re.compile(prefix).match, ctx.plan.quantized_paths) if m}
    if all_layers - done:
        raise LowbitError(f"GPTQ checkpoints quantize every decoder layer, but layers "
                          f"{', '.join(sorted(all_layers - done, key=int))} were left in float; "
                          "drop --layers or choose --format compressed-tensors or fake")


def export(ctx: ExportContext, out_dir: Path) -> None:
    _check(ctx)
    desc_act = False
    rounding = 0.0

    def convert_linear(path: str, qt: QuantizedTensor) -> dict[str, torch.Tensor]:
        nonlocal desc_act, rounding
        if qt.g_idx is not None:
            gl = ctx.fmt.group_length(qt.W_q.shape[1])
            desc_act |= not torch.equal(qt.g_idx.cpu().long(), torch.arange(qt.W_q.shape[1]) // gl)
        t = convert(qt)
        scale = qt.qparams.scale.cpu().float().T
        rounding = max(rounding, float(((t["scales"].float() - scale).abs() / scale).max()))
        return {f"{path}.{k}": v for k, v in t.items()}

    write_shards(output_tensors(ctx, convert_linear), out_dir)
    if rounding > 0:
        log.info("GPTQ scales are stored in float16: rounded by up to %.2g relative", rounding)
    ctx.config.quantization_config = quantization_config(ctx, desc_act)
    if ctx.lm_head_quantized:
        ctx.config.tie_word_embeddings = False
    save_config(ctx.config, out_dir)
