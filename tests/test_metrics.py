"""Evaluation metrics: invariants that must hold for any logits."""
from __future__ import annotations

import torch
from hypothesis import given, settings, strategies as st

from lowbit.eval.metrics import summarize, token_stats


@settings(max_examples=30, deadline=None)
@given(T=st.integers(2, 20), V=st.integers(2, 50), seed=st.integers(0, 1000))
def test_kl_of_a_distribution_with_itself_is_zero(T, V, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, V, generator=g) * 5
    s = summarize(token_stats(logits, logits.clone(), torch.randint(0, V, (T,), generator=g)))
    assert s["kld_mean"] < 1e-6 and s["kld_max"] < 1e-6 and s["top1"] == 1.0 and s["ppl"] == s["ppl_base"]


def test_kl_matches_closed_form_and_detects_change():
    p = torch.tensor([[0.7, 0.2, 0.1]]).log()
    q = torch.tensor([[0.1, 0.2, 0.7]]).log()
    s = token_stats(p, q, torch.tensor([0]))
    expected = (0.7 * torch.log(torch.tensor(7.0)) + 0.1 * torch.log(torch.tensor(1 / 7)))
    torch.testing.assert_close(s.kld, expected.reshape(1), rtol=1e-5, atol=1e-6)
    assert not bool(s.same_top1[0])
    torch.testing.assert_close(s.delta_p, torch.tensor([0.1 - 0.7]))


def test_perplexity_of_uniform_model_is_vocab_size():
    V = 37
    s = summarize(token_stats(torch.zeros(5, V), torch.zeros(5, V), torch.zeros(5, dtype=torch.long)))
    assert abs(s["ppl_base"] - V) < 1e-3
