"""Streaming layer by layer reproduces the full model exactly, on every family."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from lowbit.errors import LowbitError
from lowbit.model.stream import StreamedModel
from conftest import ALL_FAMILIES, build_tiny_model


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_streamed_forward_equals_full_model(family, tiny_models):
    path = tiny_models[family]
    full = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.randint(3, 300, (2, 20))
    sm = StreamedModel(path)
    batch = sm.embed(ids)
    for i in range(sm.num_layers):
        sm.materialize(sm.layer_path(i))
        batch.hidden = sm.run_layer(i, batch)
        sm.release(sm.layer_path(i))
    norm = sm.materialize(sm.family.final_norm)
    head = sm.materialize(sm.family.lm_head)
    logits = head(norm(batch.hidden))
    with torch.no_grad():
        ref = full(input_ids=ids).logits
    if getattr(sm.config, "final_logit_softcapping", None):
        cap = sm.config.final_logit_softcapping
        logits = torch.tanh(logits / cap) * cap
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)


def test_released_layers_hold_no_memory(tiny_llama):
    sm = StreamedModel(tiny_llama)
    sm.materialize(sm.layer_path(0))
    sm.release(sm.layer_path(0))
    assert all(p.device.type == "meta" for p in sm.layers[0].parameters())


def test_unknown_architecture_is_a_clear_error(tmp_path, tiny_tokenizer_dir):
    from transformers import GPT2Config, GPT2LMHeadModel
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path)
    with pytest.raises(LowbitError, match="unsupported architecture GPT2LMHeadModel"):
        StreamedModel(tmp_path)


def test_tied_embeddings_stream(tmp_path, tiny_tokenizer_dir):
    path = build_tiny_model("llama", tmp_path / "tied", tiny_tokenizer_dir, tie_word_embeddings=True)
    sm = StreamedModel(path)
    assert sm.tied_embeddings
    head = sm.materialize(sm.family.lm_head)
    emb = sm.store.get("model.embed_tokens.weight")
    assert torch.equal(head.weight, emb)
