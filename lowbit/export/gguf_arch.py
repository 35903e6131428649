"""Architecture knowledge for GGUF files, as data: one row per llama.cpp architecture.

Each row says which transformers ``model_type`` it covers, how the hyper-parameters become GGUF
keys, and what convert_hf_to_gguf.py does to tensors before writing them:

  arch    model types        Q/K rows            norms         extra keys
  llama   llama, mistral     rope-permuted (*)   w             vocab_size, rope.dimension_count
  qwen2   qwen2              as stored           w
  qwen3   qwen3              as stored           w             key/value_length
  gemma2  gemma2             as stored           1 + w (**)    softcaps, sliding_window, key/value_length
  gemma3  gemma3_text        as stored           1 + w (**)    sliding_window, rope.freq_base_swa, ...

(*) HF LLaMA checkpoints store Q and K with the two halves of each head's rotary dimensions in
separate blocks; llama.cpp's rope expects them interleaved, so rows are permuted per head
(`permute_qk`). A row permutation moves whole rows, so quantized rows move with their blocks.
(**) Gemma's RMSNorm multiplies by (1 + w); llama.cpp multiplies by the stored value.

Tensor names come from the `gguf` package's TensorNameMap for the arch.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable

import gguf
import torch

from ..errors import LowbitError


@dataclass(frozen=True)
class GGUFArch:
    name: str                       # llama.cpp's general.architecture
    model_types: tuple[str, ...]    # transformers config.model_type values
    permute_qk: bool = False
    norm_plus_one: bool = False
    has_output: bool = True         # False: llama.cpp always ties output to token_embd (gemma2)
    extra_keys: Callable[[Any, dict], None] | None = None  # (writer, hparams) -> None


def _rope(hp: dict) -> dict:
    """The full-attention rope parameters, from transformers 5 rope_parameters or older keys."""
    rp = hp.get("rope_parameters")
    if rp is None:
        rp = dict(hp.get("rope_scaling") or {})
        if hp.get("rope_theta") is not None:
            rp["rope_theta"] = hp["rope_theta"]
    return rp.get("full_attention", rp) if isinstance(rp, dict) else {}


def _head_dim(hp: dict) -> int:
    return hp.get("head_dim") or hp["hidden_size"] // hp["num_attention_heads"]


def _llama_keys(w, hp: dict) -> None:
    w.add_vocab_size(hp["vocab_size"])
    w.add_rope_dimension_count(_head_dim(hp))


def _kv_length(w, hp: dict) -> None:
    if hp.get("head_dim") is not None:
        w.add_key_length(hp["head_dim"])
        w.add_value_length(hp["head_dim"])


def _gemma2_keys(w, hp: dict) -> None:
    _kv_length(w, hp)
    w.add_attn_logit_softcapping(hp.get("attn_logit_softcapping") or 0.0)
    w.add_final_logit_softcapping(hp.get("final_logit_softcapping") or 0.0)
    w.add_sliding_window(hp["sliding_window"])


def _gemma3_keys(w, hp: dict) -> None:
    _kv_length(w, hp)
    if hp.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(hp["final_logit_softcapping"])
    if hp.get("sliding_window_pattern") != 1 and hp.get("sliding_window"):
        w.add_sliding_window(hp["sliding_window"])
    rp = hp.get("rope_parameters") or {}
    swa_theta = (rp.get("sliding_attention") or {}).get("rope_theta") or hp.get("rope_local_base_freq")
    if swa_theta is not None:
        w.add_rope_freq_base_swa(swa_theta)


ARCHS: tuple[GGUFArch, ...] = (
    GGUFArch("llama", ("llama", "mistral"), permute_qk=True, extra_keys=_llama_keys),
    GGUFArch("qwen2", ("qwen2",)),
    GGUFArch("qwen3", ("qwen3",), extra_keys=_kv_length),
    GGUFArch("gemma2", ("gemma2",), norm_plus_one=True, has_output=False, extra_keys=_gemma2_keys),
    GGUFArch("gemma3", ("gemma3_text",), norm_plus_one=True, extra_keys=_gemma3_keys),
)


def arch_for(config) -> GGUFArch:
    """The GGUF row for a transformers config; unsupported architectures fail loudly."""
    model_type = getattr(config, "model_type", None)
    for a in ARCHS:
        if model_type in a.model_types:
            return a
    supported = ", ".join(t for a in ARCHS for t in a.model_types)
    raise LowbitError(f"GGUF export does not support model_type {model_type!r}; it writes {supported}")


def hparams(config) -> dict:
    """The config as a plain dict (a multimodal config's text_config merged in)."""
    hp = config.to_dict()
    if isinstance(hp.get("text_config"), dict):
        hp = {**hp, **hp["text_config"]}
    return hp


def write_hparams(writer, arch: GGUFArch, hp: dict) -> None:
    """The architecture keys llama.cpp reads (convert_hf_to_gguf's TextModel.set_gguf_parameters)."""
    w = writer
    w.add_block_count(hp["num_hidden_layers"])
    w.add_context_length(hp.get("max_position_embeddings") or 4096)
    w.add_embedding_length(hp["hidden_size"])
    w.add_feed_forward_length(hp["intermediate_size"])
    w.add_head_count(hp["num_attention_heads"])
    w.add_head_count_kv(hp.get("num_key_value_heads") or hp["num_attention_heads"])
    w.add_layer_norm_rms_eps(hp.get("rms_norm_eps", 1e-6))
    rope = _rope(hp)
    if rope.get("rope_theta") is not None:
        w.add_rope_freq_base(rope["rope_theta"])
    rope_type, factor = rope.get("rope_type"), rope.get("factor")
    if rope_type == "linear" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(factor)
    elif rope_type == "yarn" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(factor)
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    elif rope_type not in (None, "default", "llama3"):
        raise LowbitError(f"GGUF export does not write rope_type {rope_type!r}; only default, linear, yarn, llama3")
    if arch.extra_keys is not None:
        arch.extra_keys(w, hp)


def llama3_rope_factors(hp: dict) -> torch.Tensor | None:
    """rope_freqs.weight [head_dim / 2] for rope_type llama3 (Llama 3.1+), else None."""
    rope = _rope(hp)
    if str(rope.get("rope_type", "")).lower() != "llama3":
        return None
    dim = _head_dim(hp)
    base = rope.get("rope_theta", 10000.0)
    factor, lo, hi = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    out = []
    for f in (1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))).tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old_ctx / hi:
            out.append(1.0)
        elif wavelen > old_ctx / lo:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


# -- tensors ------------------------------------------------------------------------------------
_LAYER = re.compile(r"\.layers\.(\d+)\.")


class TensorNames:
    """HF tensor name -> GGUF tensor name (and block index) for one arch and depth."""

    def __init__(self, arch: GGUFArch, n_layers: int):
        self.arch = arch
        self._map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.name.upper()], n_layers)

    def gguf_name(self, hf_name: str) -> str | None:
        """None for tensors llama.cpp does not load (e.g. rotary inv_freq buffers)."""
        return self._map.get_name(hf_name, try_suffixes=(".weight", ".bias"))

    @staticmethod
    def layer(hf_name: str) -> int | None:
        m = _LAYER.search(hf_name)
        return int(m.group(1)) if m else None


def permute_rows(t, n_head: int):
    """Q or K rows (HF rotary layout) -> llama.cpp's interleaved layout, per head.

    Shapes: t [n_head·head_dim, ...] (a weight, its packed GGUF rows, or a bias) -> same shape.
    Within each head, row r of the first half goes to 2r and row r of the second half to 2r + 1.
    """
    rows = t.shape[0]
    hd = rows // n_head
    assert hd * n_head == rows and hd % 2 == 0, (rows, n_head)
    return t.reshape(n_head, 2, hd // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def unpermute_rows(t, n_head: int):
    """Inverse of `permute_rows` (llama.cpp layout -> HF layout)."""
    rows = t.shape[0]
    hd = rows // n_head
    return t.reshape(n_head, hd // 2, 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def qk_heads(hf_name: str, arch: GGUFArch, hp: dict) -> int | None:
    """Heads to permute `hf_name`'s rows by (None when the arch or tensor needs no permutation)."""
    if not arch.permute_qk:
        return None
    if re.search(r"q_proj\.(weight|bias)$", hf_name):
        return hp["num_attention_heads"]
    if re.search(r"k_proj\.(weight|bias)$", hf_name):
        return hp.get("num_key_value_heads") or hp["num_attention_heads"]
    return None


def norm_shift(hf_name: str, arch: GGUFArch) -> float:
    """What convert_hf_to_gguf adds to a norm weight (1 for Gemma's (1 + w) norms)."""
    return 1.0 if arch.norm_plus_one and hf_name.endswith("norm.weight") else 0.0
