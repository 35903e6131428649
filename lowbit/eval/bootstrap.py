"""Confidence intervals for evaluation means by resampling whole windows. Pure tensor math.

Tokens inside one window are strongly correlated (same passage, shared context), so resampling
tokens would make intervals far too narrow. The unit of resampling is the window: each bootstrap
replicate draws n windows with replacement and recomputes every figure from their token sums.

Shapes: per-window sums and token counts are 1-D tensors of length n_windows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .metrics import TokenStats

# figure -> how it is computed from the resampled means (see `_figures`)
CI_FIGURES = ("kld_mean", "top1", "ppl", "ppl_increase_pct")


@dataclass(frozen=True)
class WindowSums:
    """Per-window totals: everything the figures in CI_FIGURES need. Shapes: [n_windows] float64."""

    tokens: torch.Tensor
    kld: torch.Tensor
    top1: torch.Tensor
    nll_base: torch.Tensor
    nll_cand: torch.Tensor

    @property
    def n(self) -> int:
        return int(self.tokens.numel())

    def kld_means(self) -> torch.Tensor:
        return self.kld / self.tokens


def window_sums(stats: TokenStats, tokens_per_window: list[int]) -> WindowSums:
    """Split concatenated per-token stats (on any device) back into windows and sum each one, on the CPU."""
    assert sum(tokens_per_window) == stats.kld.numel(), "window lengths do not add up to the token count"

    def per_window(t: torch.Tensor) -> torch.Tensor:
        return torch.stack([p.double().sum() for p in t.split(tokens_per_window)]).cpu()

    return WindowSums(
        tokens=torch.tensor(tokens_per_window, dtype=torch.float64),
        kld=per_window(stats.kld),
        top1=per_window(stats.same_top1),
        nll_base=per_window(stats.nll_base),
        nll_cand=per_window(stats.nll_cand),
    )


def _figures(tokens, kld, top1, nll_base, nll_cand) -> dict[str, torch.Tensor]:
    """Figures from (possibly batched [B, ...] summed) totals."""
    return {
        "kld_mean": kld / tokens,
        "top1": top1 / tokens,
        "ppl": torch.exp(nll_cand / tokens),
        "ppl_increase_pct": 100.0 * torch.expm1((nll_cand - nll_base) / tokens),
    }


def point_estimates(w: WindowSums) -> dict[str, float]:
    return {k: float(v) for k, v in _figures(w.tokens.sum(), w.kld.sum(), w.top1.sum(),
                                             w.nll_base.sum(), w.nll_cand.sum()).items()}


def bootstrap_ci(w: WindowSums, n_resamples: int = 1000, level: float = 0.95,
                 seed: int = 0) -> dict[str, tuple[float, float]]:
    """Percentile intervals for CI_FIGURES, resampling windows with replacement.

    The perplexity increase is paired: base and candidate are resampled on the same windows.
    With a single window there is nothing to resample and each interval collapses to the point.
    """
    assert 0 < level < 1 and n_resamples > 0
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, w.n, (n_resamples, w.n), generator=g)  # [B, n]
    sums = [t[idx].sum(dim=1) for t in (w.tokens, w.kld, w.top1, w.nll_base, w.nll_cand)]
    figs = _figures(*sums)
    q = torch.tensor([(1 - level) / 2, 1 - (1 - level) / 2], dtype=torch.float64)
    return {k: tuple(float(x) for x in torch.quantile(v, q)) for k, v in figs.items()}
