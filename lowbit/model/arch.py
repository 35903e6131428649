"""Architecture knowledge as data: one row per model family.

Each family says where the decoder layers live, which norm or linear feeds which linears
(the "balance groups" AWQ-style methods scale across), and whether its RMSNorm multiplies by
``w`` or by ``1 + w`` (Gemma). Model plumbing reads this table; nothing else knows a family.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import LowbitError


@dataclass(frozen=True)
class BalanceGroup:
    """`prev` (a norm or a linear inside the layer) feeds every module in `linears`.

    Scaling input channel j of the linears by s_j is undone by dividing output j of `prev`
    by s_j. `block` names the module whose output measures the group's error (AWQ's objective).
    `prev_rows`, when set, is the slice of prev's output rows that feeds the linears, as
    (start_fraction_num, denominator): e.g. (1, 2) = the second half of a fused gate_up_proj.
    """

    prev: str
    linears: tuple[str, ...]
    block: str
    prev_rows: tuple[int, int] | None = None


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    balance: tuple[BalanceGroup, ...]
    norm_plus_one: bool = False
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"


_ATTN = BalanceGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn")
_V_O = BalanceGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj")
_UP_DOWN = BalanceGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj")

FAMILIES: tuple[Family, ...] = (
    Family(
        "llama",
        ("llama", "mistral", "qwen2", "qwen3"),
        (_ATTN, _V_O, BalanceGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"), _UP_DOWN),
    ),
    Family(
        "gemma",
        ("gemma2", "gemma3_text"),
        (_ATTN, _V_O, BalanceGroup("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"), _UP_DOWN),
        norm_plus_one=True,
    ),
    Family(
        "phi3",
        ("phi3",),
        (
            BalanceGroup("input_layernorm", ("self_attn.qkv_proj",), "self_attn"),
            BalanceGroup("post_attention_layernorm", ("mlp.gate_up_proj",), "mlp"),
            BalanceGroup("mlp.gate_up_proj", ("mlp.down_proj",), "mlp.down_proj", prev_rows=(1, 2)),
        ),
    ),
)


def family_for(config) -> Family:
    """The family row for a transformers config; unknown architectures fail loudly."""
    model_type = getattr(config, "model_type", None)
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    archs = ", ".join(getattr(config, "architectures", None) or ["?"])
    supported = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise LowbitError(
        f"unsupported architecture {archs} (model_type {model_type!r}); lowbit supports: {supported}"
    )
