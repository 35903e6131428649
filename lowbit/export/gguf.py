"""GGUF files that llama.cpp runs: architecture keys, tokenizer, and every tensor in its block type.

Two entry points share one writer:

  export(ctx, out_dir)        the ``--format gguf`` exporter of ``lowbit quantize``: linears the
                              method quantized onto a ``gguf:<type>`` grid are written as their
                              codes (AWQ scales folded, GPTQ error feedback done on that grid);
                              everything else is encoded by the preset of that type
  export_gguf(model, out, t)  ``lowbit export gguf``: a float or already-quantized checkpoint as
                              preset `t` (Q4_K_M, Q8_0, ...; see formats/gguf/presets.py)

Per tensor (GGUF name from gguf_arch.TensorNames, type from presets.type_for) one of these paths:

  codes       the source holds codes on this GGUF grid: packed as they are
  direct      the source holds symmetric INT4 codes in groups of 32 and the type is Q4_0 (Q4_X) or
              Q8_0: blocks with d = scale and the same codes, exact up to the fp16 scale
  encoded     float weights through lowbit's llama.cpp-identical encoder (with the imatrix, if any)
  re-encoded  quantized source weights that the type's grid cannot hold: dequantized, then encoded
  float       F32 (1-D tensors, norms) or the F16 / BF16 / F32 presets

Q/K rows of LLaMA-arch models are permuted into llama.cpp's rope layout after encoding (whole
rows move, so blocks stay intact); Gemma norms are written as 1 + w. The file is written under a
temporary name and renamed, so a failed export leaves nothing behind.

Shapes: HF weights [out, in]; GGUF block data uint8 [out, in / block_size · type_size].
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch

from ..errors import LowbitError
from ..formats import QParams, QuantizedTensor
from ..formats.gguf import (GGUF_FORMATS, BLOCK_TYPES, Fidelity, GGUFFormat, Imatrix, fallback_type, q4x_fidelity,
                            q4x_quantized, read_imatrix)
from ..formats.gguf.legacy import Q8_0
from ..formats.gguf.presets import FLOAT_TYPES, Preset, get_preset, preset_for_block_type, type_for
from ..formats.map import FormatMap, cached
from ..paths import disk_full_as_error
from .gguf_arch import (GGUFArch, TensorNames, arch_for, hparams, llama3_rope_factors, norm_shift, permute_rows,
                        qk_heads, write_hparams)
from .gguf_source import CheckpointSource, int4_group32
from .gguf_vocab import write_vocab
from .writer import ExportContext

log = logging.getLogger(__name__)

ROPE_FREQS = "rope_freqs.weight"
_FLOAT_GGML = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
               "bf16": gguf.GGMLQuantizationType.BF16}


@dataclass(frozen=True)
class TensorPlan:
    """One tensor of the file: where it comes from and how it is stored."""

    hf_name: str               # source name (ROPE_FREQS for the generated llama3 rope factors)
    name: str                  # GGUF name
    shape: tuple[int, ...]     # HF shape, [out, in] or [n]
    type: str                  # BLOCK_TYPES key or f32 / f16 / bf16
    heads: int | None = None   # permute rows per head (LLaMA Q/K)
    shift: float = 0.0         # added to the values (Gemma norms)

    @property
    def nbytes(self) -> int:
        n = int(np.prod(self.shape))
        if self.type in FLOAT_TYPES:
            return n * (4 if self.type == "f32" else 2)
        bt = BLOCK_TYPES[self.type]
        return n // bt.block_size * bt.type_size


@dataclass
class ExportReport:
    """What was written: the file, its preset, and per GGUF tensor (type, path taken).

    fidelity: per tensor written as Q4_X (INT4 codes to Q4_0 directly), its agreement with the INT4
    source beside what plain Q4_0 re-quantization would have given ({"q4_0": ..., "q4_x": ...}).
    """

    path: Path
    preset: str
    tensors: dict[str, tuple[str, str]] = field(default_factory=dict)
    fidelity: dict[str, dict[str, Fidelity]] = field(default_factory=dict)

    def counts(self, index: int) -> Counter:
        return Counter(v[index] for v in self.tensors.values())

    def fidelity_summary(self) -> dict[str, Fidelity] | None:
        """Worst case over the Q4_X tensors: least cosine, largest max-abs and relative error."""
        if not self.fidelity:
            return None
        return {k: Fidelity(min(f[k].cosine for f in self.fidelity.values()),
                            max(f[k].max_abs_err for f in self.fidelity.values()),
                            max(f[k].rel_max_abs_err for f in self.fidelity.values())) for k in ("q4_0", "q4_x")}


# -- sources ------------------------------------------------------------------------------------
class PlanSource:
    """The weights of a finished ``lowbit quantize`` run: the untouched source, the method's codes
    (on a GGUF grid) and its updated parameters (e.g. norms with AWQ scales folded in)."""

    def __init__(self, ctx: ExportContext):
        self.ctx = ctx
        self._quantized = {f"{p}.weight" for p in ctx.plan.quantized_paths}
        self._updated = set(ctx.plan.updated_names)
        self._names = ctx.store.keys() + sorted(self._quantized - set(ctx.store.keys()))

    def names(self) -> list[str]:
        return list(self._names)

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def gguf_type(self, name: str) -> str | None:
        if name not in self._quantized:
            return None
        fmt = self.ctx.plan.format_name(name.removesuffix(".weight"))
        if not fmt.startswith("gguf:"):
            raise LowbitError(f"{name} was quantized onto {fmt!r}, not a GGUF block type")
        return fmt.removeprefix("gguf:")

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self.ctx.store:
            return self.ctx.store.shape(name)
        return tuple(self.quantized(name).W_q.shape)

    def quantized(self, name: str) -> QuantizedTensor | None:
        return self.ctx.plan.quantized(name.removesuffix(".weight")) if name in self._quantized else None

    def float(self, name: str) -> torch.Tensor:
        if name in self._updated:
            return self.ctx.plan.update(name).float()
        if name in self._quantized:
            return self.quantized(name).dequantize()
        return self.ctx.store.get(name).float()


# -- planning -----------------------------------------------------------------------------------
def plan_tensors(source, config, preset: Preset, has_imatrix: bool = False) -> list[TensorPlan]:
    """Every tensor of the file with its GGUF name and type, in source order (output last)."""
    arch = arch_for(config)
    hp = hparams(config)
    n_layers = hp["num_hidden_layers"]
    names = TensorNames(arch, n_layers)
    n_gqa = hp["num_attention_heads"] // (hp.get("num_key_value_heads") or hp["num_attention_heads"])
    lm_head = "lm_head.weight"
    write_output = lm_head in source and (source.gguf_type(lm_head) is not None
                                          or not hp.get("tie_word_embeddings", False))
    if write_output and not arch.has_output:
        raise LowbitError(f"llama.cpp's {arch.name} ties the output layer to the embeddings, but this checkpoint "
                          "has its own (or a quantized) lm_head; export a model with tied embeddings")
    entries: list[tuple[str, str, tuple[int, ...]]] = []
    for hf in source.names():
        if hf == lm_head and not write_output:
            continue
        if hf.endswith("rotary_emb.inv_freq"):
            continue
        g = names.gguf_name(hf)
        if g is None:
            raise LowbitError(f"tensor {hf} has no GGUF name in llama.cpp's {arch.name} architecture; "
                              "this checkpoint has parts GGUF export does not know")
        entries.append((hf, g, tuple(source.shape(hf))))
    factors = llama3_rope_factors(hp) if arch.name == "llama" else None
    if factors is not None:
        entries.append((ROPE_FREQS, ROPE_FREQS, tuple(factors.shape)))
    tied = not any(g == "output.weight" for _, g, _ in entries)
    plans = []
    for hf, g, shape in entries:
        fixed = source.gguf_type(hf) if hf != ROPE_FREQS else None
        t = fixed or type_for(g, shape, TensorNames.layer(hf), n_layers, preset, tied_embeddings=tied,
                              has_imatrix=has_imatrix, n_gqa=n_gqa)
        plans.append(TensorPlan(hf, g, shape, t, qk_heads(hf, arch, hp), norm_shift(hf, arch)))
    return plans


# -- encoding -----------------------------------------------------------------------------------
def _importance(imatrix: Imatrix | None, name: str, in_features: int, quiet: bool = False) -> torch.Tensor | None:
    """llama-quantize's quant_weights for one GGUF tensor (None without data for it)."""
    if imatrix is None or name not in imatrix.entries:
        if imatrix is not None and name != "token_embd.weight" and not quiet:
            log.info("imatrix has no data for %s; encoding it without importance", name)
        return None
    imp = torch.from_numpy(np.asarray(imatrix.importance(name), dtype=np.float32)).reshape(-1)
    if imp.numel() != in_features:
        raise LowbitError(f"imatrix entry {name} has {imp.numel()} values but the tensor's rows have "
                          f"{in_features}; the imatrix was computed for another model")
    return imp


def _direct(qt: QuantizedTensor, block_type: str) -> QuantizedTensor | None:
    """Symmetric INT4 group-32 codes as Q4_0 (Q4_X) or Q8_0 blocks with d = scale (no re-rounding)."""
    grid = int4_group32(qt)
    if grid is None:
        return None
    codes, scales = grid
    if block_type == "q4_0":
        return q4x_quantized(codes, scales)
    if block_type == "q8_0":
        d = scales.to(torch.float16).float()
        return QuantizedTensor(codes.to(torch.int8), QParams(d, torch.zeros_like(d)), Q8_0())
    return None


def _rel_max_err(W: torch.Tensor, W_r: torch.Tensor) -> float:
    amax = float(W.abs().max()) if W.numel() else 0.0
    return float((W_r - W).abs().max()) / amax if amax > 0 else 0.0


def encode_tensor(tp: TensorPlan, source, imatrix: Imatrix | None = None,
                  generated: dict[str, torch.Tensor] | None = None) -> tuple[np.ndarray, str]:
    """The tensor's GGUF data (in the file's row order) and the path it took (module docstring).
    `generated` holds tensors that are not in the source (llama3 rope factors)."""
    if tp.type in FLOAT_TYPES:
        W = generated[tp.hf_name] if generated and tp.hf_name in generated else source.float(tp.hf_name) + tp.shift
        arr = W.numpy().astype(np.float32)
        if tp.type == "f16":
            arr = arr.astype(np.float16)
        elif tp.type == "bf16":
            arr = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.BF16)
        how = "float"
    else:
        fmt: GGUFFormat = GGUF_FORMATS[f"gguf:{tp.type}"]()
        qt = source.quantized(tp.hf_name)
        if qt is not None and isinstance(qt.format, GGUFFormat):
            if qt.format.block.name != tp.type:
                raise LowbitError(f"{tp.hf_name}: codes are {qt.format.name} but the plan says {tp.type}")
            arr, how = qt.format.pack(qt)["weight_blocks"].numpy(), "codes"
        else:
            direct = _direct(qt, tp.type) if qt is not None else None
            if direct is not None:
                arr, how = direct.format.pack(direct)["weight_blocks"].numpy(), "direct"
            else:
                W = qt.dequantize() if qt is not None else source.float(tp.hf_name) + tp.shift
                imp = _importance(imatrix, tp.name, W.shape[-1])
                arr = fmt.to_bytes(W, importance=imp)
                how = "re-encoded" if qt is not None else "encoded+imatrix" if imp is not None else "encoded"
            if qt is not None:
                err = _rel_max_err(qt.dequantize(), fmt.from_bytes(arr))
                log.info("%s: %s %s from %s-bit codes, max|err| %.3g%% of amax", tp.name, how, tp.type,
                         qt.format.bits, 100 * err)
    if tp.heads is not None:
        arr = permute_rows(arr, tp.heads)
    return np.ascontiguousarray(arr), how


# -- writing ------------------------------------------------------------------------------------
def _info_args(tp: TensorPlan) -> tuple[tuple[int, ...], np.dtype, int, gguf.GGMLQuantizationType | None]:
    """add_tensor_info's (shape, dtype, nbytes, raw_dtype) for a planned tensor."""
    if tp.type == "f32":
        return tp.shape, np.dtype(np.float32), tp.nbytes, None
    if tp.type == "f16":
        return tp.shape, np.dtype(np.float16), tp.nbytes, None
    raw = _FLOAT_GGML.get(tp.type) or gguf.GGMLQuantizationType(BLOCK_TYPES[tp.type].ggml_type)
    row_bytes = tp.nbytes // int(np.prod(tp.shape[:-1]))
    return (*tp.shape[:-1], row_bytes), np.dtype(np.uint8), tp.nbytes, raw


def write_gguf(out_path: Path, source, config, tokenizer_dir: Path, preset: Preset,
               imatrix: Imatrix | None = None, name: str | None = None) -> ExportReport:
    """Write the whole file atomically (temp name, then rename); returns what was written."""
    out_path = Path(out_path)
    arch: GGUFArch = arch_for(config)
    hp = hparams(config)
    factors = llama3_rope_factors(hp) if arch.name == "llama" else None
    generated = {ROPE_FREQS: factors} if factors is not None else {}
    plans = plan_tensors(source, config, preset, has_imatrix=imatrix is not None)
    for tp in plans:  # a mismatched imatrix fails before anything is written
        if tp.type not in FLOAT_TYPES and source.gguf_type(tp.hf_name) is None:
            _importance(imatrix, tp.name, tp.shape[-1], quiet=True)
    report = ExportReport(out_path, preset.name)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    w = gguf.GGUFWriter(tmp, arch.name)
    try:
        with disk_full_as_error(out_path):
            w.add_type(gguf.GGUFType.MODEL)
            w.add_name(name or str(hp.get("_model_name_or_path") or Path(tokenizer_dir).name))
            write_hparams(w, arch, hp)
            w.add_file_type(preset.file_type)
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
            write_vocab(w, tokenizer_dir, arch.name, hp["vocab_size"])
            for tp in plans:
                shape, dtype, nbytes, raw = _info_args(tp)
                w.add_tensor_info(tp.name, shape, dtype, nbytes, raw_dtype=raw)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for tp in plans:
                arr, how = encode_tensor(tp, source, imatrix, generated)
                w.write_tensor_data(arr)
                report.tensors[tp.name] = (tp.type, how)
                if how == "direct" and tp.type == "q4_0":
                    report.fidelity[tp.name] = q4x_fidelity(*int4_group32(source.quantized(tp.hf_name)))
                log.debug("%s <- %s: %s (%s)", tp.name, tp.hf_name, tp.type, how)
            w.close()
            os.replace(tmp, out_path)
    finally:
        w.close()
        tmp.unlink(missing_ok=True)
    types = ", ".join(f"{t} {n}" for t, n in sorted(report.counts(0).items()))
    paths = ", ".join(f"{h} {n}" for h, n in sorted(report.counts(1).items()))
    log.info("wrote %s (%s, %.1f MiB): types %s; paths %s", out_path, preset.name,
             out_path.stat().st_size / 2**20, types, paths)
    worst = report.fidelity_summary()
    if worst is not None:
        log.info("Q4_X vs the INT4 source over %d tensors (worst): plain Q4_0 re-quantization %s; Q4_X %s",
                 len(report.fidelity), worst["q4_0"], worst["q4_x"])
    return report


# -- entry points -------------------------------------------------------------------------------
def unsupported(fmt) -> str | None:
    """Why this exporter cannot store `fmt` (checked before quantizing), or None."""
    if not isinstance(fmt, GGUFFormat):
        return (f"--format gguf writes GGUF block types, not {fmt.name!r}; "
                "choose --weight-format gguf:q4_k (or another gguf:<type>)")
    return None


def export(ctx: ExportContext, out_dir: Path) -> None:
    """``lowbit quantize --format gguf``: out_dir/model.gguf with the method's codes as they are."""
    if any(ctx.plan.quantized(p).g_idx is not None for p in ctx.plan.quantized_paths):
        raise LowbitError("GGUF blocks hold contiguous groups; quantize without act-order (g_idx)")
    preset = ctx.plan.formats.info.get("preset") or preset_for_block_type(ctx.fmt.block.name)
    write_gguf(Path(out_dir) / "model.gguf", PlanSource(ctx), ctx.config, ctx.store.dir, preset)


def is_gguf_spec(weight_format: str) -> bool:
    """Whether --weight-format names GGUF types: gguf:<block type> or gguf:<llama.cpp preset>."""
    return weight_format.lower().startswith("gguf:")


def linear_formats(config, weight_format: str, has_imatrix: bool = False) -> FormatMap:
    """The GGUF block type of every linear for ``--weight-format gguf:<type>``, as llama-quantize
    would choose it for the same file type.

    gguf:<preset> (gguf:Q4_K_M): each linear gets the preset's type for its GGUF tensor
    (presets.type_for: ffn_down/attn_v Q6_K in some layers, ...); gguf:<block type> (gguf:q4_k):
    every linear gets that type, as `llama-quantize --pure`. Either way a row the type cannot hold
    falls back per tensor (Q4_K -> Q5_0, Q6_K -> Q8_0 on SmolLM2's 576-wide rows). `has_imatrix`:
    the method hands the encoders calibration importance (llama-quantize --imatrix's rules).
    The map's info["preset"] is the preset for the tensors no method quantizes (embeddings).
    """
    spec = weight_format.split(":", 1)[1]
    pure = spec.lower() if spec.lower() in BLOCK_TYPES else None
    preset = preset_for_block_type(pure) if pure else get_preset(spec)
    if preset.default in FLOAT_TYPES:
        raise LowbitError(f"--weight-format {weight_format} is a float type; choose a quantized GGUF type "
                          "(gguf:Q4_K_M, gguf:q4_k, ...) or export floats with `lowbit export gguf`")
    arch, hp = arch_for(config), hparams(config)
    n_layers = hp["num_hidden_layers"]
    names = TensorNames(arch, n_layers)
    n_gqa = hp["num_attention_heads"] // (hp.get("num_key_value_heads") or hp["num_attention_heads"])
    make = cached(lambda t: GGUF_FORMATS[f"gguf:{t}"]())

    def rule(path: str, shape: tuple[int, ...]) -> GGUFFormat:
        hf = f"{path}.weight"
        if pure:
            t = fallback_type(pure, shape[-1])
        else:
            g = names.gguf_name(hf)
            if g is None:
                raise LowbitError(f"{hf} has no GGUF name in llama.cpp's {arch.name} architecture")
            t = type_for(g, shape, TensorNames.layer(hf), n_layers, preset, has_imatrix=has_imatrix, n_gqa=n_gqa)
        if t not in BLOCK_TYPES:
            raise LowbitError(f"{path}: rows of {shape[-1]} weights fit no GGUF block type ({preset.name} "
                              f"would write it as {t}); quantize without this linear or export with "
                              "`lowbit export gguf`")
        return make(t)

    return FormatMap(make(preset.default), rule, preset=preset)


def export_gguf(model_path: str, output: str, type_name: str = "Q8_0", imatrix: str | None = None,
                overwrite: bool = False) -> ExportReport:
    """``lowbit export gguf``: `model_path` (float, compressed-tensors, GPTQ or AutoAWQ) as preset
    `type_name` in the file `output`. The input is only read."""
    from transformers import AutoConfig

    from ..model.source import resolve_model_dir
    preset = get_preset(type_name)
    out = Path(output).expanduser()
    if out.suffix != ".gguf":
        raise LowbitError(f"--output {out} should name a .gguf file")
    if out.exists() and not overwrite:
        raise LowbitError(f"{out} already exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise LowbitError(f"the directory of --output {out} does not exist; create it first")
    model_dir = resolve_model_dir(model_path)
    config = AutoConfig.from_pretrained(model_dir)
    im = read_imatrix(imatrix) if imatrix else None
    source = CheckpointSource(model_dir)
    if source.kind != "float":
        log.info("%s holds %s %d-bit weights: symmetric INT4 group-32 codes go to Q4_0/Q8_0 directly, "
                 "everything else is dequantized and re-encoded", model_dir, source.kind, source.bits)
    return write_gguf(out, source, config, model_dir, preset, im)
