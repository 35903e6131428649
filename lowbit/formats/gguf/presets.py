"""llama.cpp's mixed GGUF presets (``Q4_K_M`` …): which block type each tensor gets.

A preset is llama-quantize's file type: one default block type plus rules that give some tensors
more bits. The rules follow ``llama_tensor_get_type_impl`` and ``tensor_type_fallback`` in
src/llama-quant.cpp (llama.cpp vendored by llama-cpp-python 0.3.36), for dense models:

  tensor                  rule (n = layers, i = layer, more(i) = i < n/8 or i ≥ 7n/8 or (i − n/8) % 3 == 2)
  output.weight           Q6_K (Q8_0 for Q8_0, or when its row is not a multiple of the default's block)
  token_embd.weight       the default; with tied embeddings (no output.weight) the output rule
  attn_v                  Q2_K: Q4_K if n_head/n_head_kv ≥ 4 else Q3_K · Q3_K_M: Q5_K for i < 2, else Q4_K
                          Q3_K_L: Q5_K · Q4_K_M, Q5_K_M: Q6_K where more(i) · Q4_K_S: Q5_K for i < 4
  ffn_down                Q2_K: Q3_K · Q3_K_M: Q5_K for i < n/16, else Q4_K · Q3_K_L: Q5_K
                          Q4_K_M, Q5_K_M: Q6_K where more(i) · Q4_K_S: Q5_K for i < n/8
                          Q4_0 / Q5_0 with an imatrix: Q4_1 / Q5_1 for i < n/8
  attn_output             Q2_K: Q3_K · Q3_K_M: Q4_K · Q3_K_L: Q5_K
  1-D tensors, norms      F32 (never quantized)

then, per tensor, the fallback when its row length is not a multiple of the chosen block
(`table.fallback_type`: Q4_K→Q5_0, Q5_K→Q5_1, Q6_K→Q8_0, Q2_K/Q3_K→Q4_0, else F16).
Not modelled: mixture-of-experts and 70B special cases, Falcon, the IQ types.

Shapes: `shape` is the PyTorch weight shape [out, in]; the row length is its last entry.
"""
from __future__ import annotations

from dataclasses import dataclass

from ...errors import LowbitError
from .table import BLOCK_TYPES, fallback_type

FLOAT_TYPES = ("f32", "f16", "bf16")


@dataclass(frozen=True)
class Preset:
    name: str       # llama.cpp's spelling, e.g. "Q4_K_M"
    file_type: int  # general.file_type (llama_ftype)
    default: str    # block type most 2-D weights get: a BLOCK_TYPES key or f32/f16/bf16


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("F32", 0, "f32"),
    Preset("F16", 1, "f16"),
    Preset("BF16", 32, "bf16"),
    Preset("Q4_0", 2, "q4_0"),
    Preset("Q4_1", 3, "q4_1"),
    Preset("Q8_0", 7, "q8_0"),
    Preset("Q5_0", 8, "q5_0"),
    Preset("Q5_1", 9, "q5_1"),
    Preset("Q2_K", 10, "q2_k"),
    Preset("Q3_K_S", 11, "q3_k"),
    Preset("Q3_K_M", 12, "q3_k"),
    Preset("Q3_K_L", 13, "q3_k"),
    Preset("Q4_K_S", 14, "q4_k"),
    Preset("Q4_K_M", 15, "q4_k"),
    Preset("Q5_K_S", 16, "q5_k"),
    Preset("Q5_K_M", 17, "q5_k"),
    Preset("Q6_K", 18, "q6_k"),
)}


def get_preset(name: str) -> Preset:
    """The preset called `name` (case-insensitive, e.g. "q4_k_m")."""
    try:
        return PRESETS[name.upper()]
    except KeyError:
        raise LowbitError(f"unknown GGUF type {name!r}; choose one of {', '.join(PRESETS)}") from None


def preset_for_block_type(block_type: str) -> Preset:
    """The plain preset whose default is `block_type` (q4_k -> Q4_K_S, q6_k -> Q6_K, q4_0 -> Q4_0)."""
    t = block_type.lower()
    for p in PRESETS.values():
        if p.default == t:
            return p
    raise LowbitError(f"no GGUF preset uses block type {block_type!r}; known: {', '.join(BLOCK_TYPES)}")


def quantizable(name: str, shape: tuple[int, ...]) -> bool:
    """Whether llama-quantize would quantize this GGUF tensor (2-D weights that are not norms)."""
    return len(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    for key in ("attn_qkv.weight", "attn_kv_b.weight", "attn_v.weight"):
        if key in name:
            return "attn_v"
    for key, cat in (("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
                     ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down")):
        if key in name:
            return cat
    return "other"


def _more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _block_size(t: str) -> int:
    return BLOCK_TYPES[t].block_size


def _mixed_type(cat: str, row_len: int, i: int, n: int, p: Preset, tied: bool, has_imatrix: bool,
                n_gqa: int) -> str:
    """llama_tensor_get_type_impl for the presets in PRESETS (before the row-length fallback)."""
    f, t = p.name, p.default
    if cat == "output" or (cat == "token_embd" and tied):
        if row_len % _block_size(t):
            return "q8_0"
        return t if t == "q8_0" else "q6_k"
    if cat == "attn_v":
        if f == "Q2_K":
            return "q4_k" if n_gqa >= 4 else "q3_k"
        if f == "Q3_K_M":
            return "q5_k" if i < 2 else "q4_k"
        if f == "Q3_K_L":
            return "q5_k"
        if f in ("Q4_K_M", "Q5_K_M") and _more_bits(i, n):
            return "q6_k"
        if f == "Q4_K_S" and i < 4:
            return "q5_k"
        return t
    if cat == "ffn_down":
        if f == "Q2_K":
            return "q3_k"
        if f == "Q3_K_M":
            return "q5_k" if i < n // 16 else "q4_k"
        if f == "Q3_K_L":
            return "q5_k"
        if f in ("Q4_K_M", "Q5_K_M"):
            return "q6_k" if _more_bits(i, n) else t
        if f == "Q4_K_S":
            return "q5_k" if i < n // 8 else t
        if f in ("Q4_0", "Q5_0") and has_imatrix and i < n // 8:
            return "q4_1" if f == "Q4_0" else "q5_1"
        return t
    if cat == "attn_output":
        return {"Q2_K": "q3_k", "Q3_K_M": "q4_k", "Q3_K_L": "q5_k"}.get(f, t)
    return t


def type_for(tensor_name: str, shape: tuple[int, ...], layer_index: int | None, n_layers: int,
             preset: str | Preset, *, tied_embeddings: bool = False, has_imatrix: bool = False,
             n_gqa: int = 1) -> str:
    """The block type llama-quantize gives GGUF tensor `tensor_name` of PyTorch shape [out, in].

    `layer_index` is the tensor's block (None outside the blocks); `tied_embeddings` means the
    file has no output.weight; `n_gqa` = n_head / n_head_kv. Returns a BLOCK_TYPES key or
    "f32" / "f16" / "bf16".
    """
    p = preset if isinstance(preset, Preset) else get_preset(preset)
    shape = tuple(int(s) for s in shape)
    if not quantizable(tensor_name, shape):
        return "f32"
    if p.default in FLOAT_TYPES:
        return p.default
    cat = _category(tensor_name)
    i = layer_index if layer_index is not None else 0
    chosen = _mixed_type(cat, shape[-1], i, n_layers, p, tied_embeddings, has_imatrix, n_gqa)
    return fallback_type(chosen, shape[-1])
