"""Per-token agreement between a base and a candidate model. Pure tensor math.

Shapes: base_logits, cand_logits [T, V]; targets [T] (the next token at each position).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenStats:
    """Per-token figures for T positions (1-D tensors of length T)."""

    kld: torch.Tensor         # KL(base ‖ candidate), nats
    nll_base: torch.Tensor
    nll_cand: torch.Tensor
    same_top1: torch.Tensor   # bool: argmax agrees
    delta_p: torch.Tensor     # p_cand − p_base of the token the base ranks first

    @staticmethod
    def concat(parts: list["TokenStats"]) -> "TokenStats":
        return TokenStats(*(torch.cat([getattr(p, f) for p in parts]) for f in TokenStats.__dataclass_fields__))


def token_stats(base_logits: torch.Tensor, cand_logits: torch.Tensor, targets: torch.Tensor) -> TokenStats:
    assert base_logits.shape == cand_logits.shape and base_logits.shape[0] == targets.shape[0]
    lp_b = torch.log_softmax(base_logits.float(), dim=-1)
    lp_c = torch.log_softmax(cand_logits.float(), dim=-1)
    kld = (lp_b.exp() * (lp_b - lp_c)).double().sum(-1).clamp(min=0)
    idx = targets.unsqueeze(-1)
    top_b = lp_b.argmax(-1, keepdim=True)
    return TokenStats(
        kld=kld.float(),
        nll_base=-lp_b.gather(-1, idx).squeeze(-1).float(),
        nll_cand=-lp_c.gather(-1, idx).squeeze(-1).float(),
        same_top1=(top_b == lp_c.argmax(-1, keepdim=True)).squeeze(-1),
        delta_p=(lp_c.gather(-1, top_b).exp() - lp_b.gather(-1, top_b).exp()).squeeze(-1).float(),
    )


def summarize(s: TokenStats) -> dict[str, float]:
    """Aggregate figures: perplexities, KLD distribution, top-1 agreement, RMS Δp."""
    kld = s.kld.double()
    return {
        "tokens": int(kld.numel()),
        "ppl_base": float(torch.exp(s.nll_base.double().mean())),
        "ppl": float(torch.exp(s.nll_cand.double().mean())),
        "kld_mean": float(kld.mean()),
        "kld_median": float(kld.median()),
        "kld_p99": float(torch.quantile(kld, 0.99)),
        "kld_max": float(kld.max()),
        "top1": float(s.same_top1.double().mean()),
        "same_top_p": float(s.same_top1.double().mean()),
        "rms_delta_p": float(torch.sqrt((s.delta_p.double() ** 2).mean())),
    }
