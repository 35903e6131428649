"""KLD on the base model's own answers (seed 000): prompts, chat template, generation, cache, scoring."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

import lowbit
from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.eval import answers as A
from lowbit.eval.evaluate import load_causal_lm
from lowbit.eval.metrics import summarize, token_stats

TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant:{% endif %}")
GEN = A.GenerationConfig(max_new_tokens=10)


@pytest.fixture(autouse=True)
def _own_eval_cache(tmp_path, monkeypatch):
    """A cache of this test's own: base hidden states and answers cached by other tests (same tiny
    base, text and windows) must not change what this one loads, nor this one theirs."""
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "lowbit-cache"))


@pytest.fixture(scope="module")
def chat_base(tiny_models, tmp_path_factory):
    """The tiny llama with a chat template, and an RTN int4 candidate of it."""
    from transformers import AutoTokenizer
    root = tmp_path_factory.mktemp("answers")
    base = root / "base"
    shutil.copytree(tiny_models["llama"], base)
    tok = AutoTokenizer.from_pretrained(base)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(base)
    cand = lowbit.quantize(base, root / "rtn", bits=4, group_size=32, n_calib=4, seq_len=32, progress=False)
    return {"base": str(base), "cand": str(cand)}


def test_embedded_prompts_and_user_files(tmp_path):
    ps = A.load_prompts()
    assert len(ps.prompts) >= 30 and len(set(ps.prompts)) == len(ps.prompts)
    assert A.load_prompts(n=3).prompts == ps.prompts[:3]
    j = tmp_path / "p.jsonl"
    j.write_text('{"prompt": "one"}\n\n{"instruction": "two"}\n{"question": "three"}\n')
    assert A.load_prompts(str(j)).prompts == ("one", "two", "three")
    t = tmp_path / "p.txt"
    t.write_text("first prompt\n\n  second prompt  \n")
    assert A.load_prompts(str(t)).prompts == ("first prompt", "second prompt")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"answer": "x"}\n')
    with pytest.raises(LowbitError, match="bad.jsonl:1 has none of the fields"):
        A.load_prompts(str(bad))
    with pytest.raises(LowbitError, match="not found"):
        A.load_prompts(str(tmp_path / "missing.jsonl"))
    assert A.load_prompts(str(j)).sha256 != A.load_prompts(str(t)).sha256


def test_prompts_go_through_the_chat_template(chat_base, tiny_llama):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(chat_base["base"])
    got = A.prompt_ids(tok, "hello there")
    want = tok("<s>user: hello there</s><s>assistant:", add_special_tokens=False).input_ids
    assert got.tolist() == want
    plain = AutoTokenizer.from_pretrained(tiny_llama)  # no template: the prompt and a newline
    assert A.prompt_ids(plain, "hello there").tolist() == plain("hello there\n").input_ids


def test_answers_are_the_base_greedy_continuation_and_hidden_states_rebuild_its_logits(chat_base):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(chat_base["base"])
    model, _ = load_causal_lm(chat_base["base"])
    s = A.generate_answers(model, tok, A.load_prompts(n=3), A.GenerationConfig(10, batch_size=1), progress=False)
    for p, a, h in zip(s.prompts, s.answers, s.hidden):
        assert 1 <= a.numel() <= GEN.max_new_tokens and h.shape == (a.numel(), 64)
        seq = p.clone()
        for _ in range(a.numel()):  # greedy by hand
            nxt = model(input_ids=seq[None]).logits[0, -1].argmax()
            seq = torch.cat([seq, nxt[None]])
        assert torch.equal(seq[p.numel():], a)
        with torch.no_grad():
            ref = model(input_ids=torch.cat([p, a])[None]).logits[0, p.numel() - 1:-1]
        torch.testing.assert_close(s.head(h), ref, rtol=1e-4, atol=1e-4)


def test_answer_cache_key_follows_base_prompts_ids_and_generation():
    ps, ids = A.load_prompts(n=2), [torch.tensor([1, 2]), torch.tensor([3])]
    k = A.answers_key("h", ps, GEN, ids)
    assert k == A.answers_key("h", ps, GEN, ids)
    assert len({k, A.answers_key("h2", ps, GEN, ids), A.answers_key("h", A.load_prompts(n=3), GEN, ids),
                A.answers_key("h", ps, A.GenerationConfig(max_new_tokens=11), ids),
                A.answers_key("h", ps, A.GenerationConfig(10, True, seed=1), ids),
                A.answers_key("h", ps, GEN, [torch.tensor([1, 2]), torch.tensor([4])])}) == 6


def test_batched_answers_equal_one_prompt_at_a_time(chat_base):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(chat_base["base"])
    model, _ = load_causal_lm(chat_base["base"])
    ps = A.load_prompts(n=5)  # prompts of different lengths: left padding must not change the answers
    one = A.generate_answers(model, tok, ps, A.GenerationConfig(8, batch_size=1), progress=False)
    many = A.generate_answers(model, tok, ps, A.GenerationConfig(8, batch_size=3), progress=False)
    assert len({p.numel() for p in one.prompts}) > 1
    assert all(torch.equal(x, y) for x, y in zip(one.answers, many.answers))
    for x, y in zip(one.hidden, many.hidden):
        torch.testing.assert_close(x, y)


def test_sampled_answers_repeat_for_a_seed_and_change_with_it(chat_base):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(chat_base["base"])
    model, _ = load_causal_lm(chat_base["base"])
    ps = A.load_prompts(n=2)
    run = lambda seed: A.generate_answers(model, tok, ps, A.GenerationConfig(8, True, seed=seed),  # noqa: E731
                                          progress=False).answers
    one, again, other = run(1), run(1), run(2)
    assert all(torch.equal(x, y) for x, y in zip(one, again))
    assert any(not torch.equal(x, y) for x, y in zip(one, other))


def test_candidates_are_scored_on_answer_tokens_only_and_the_cache_is_reused(chat_base, tmp_path, monkeypatch):
    base, cand = chat_base["base"], chat_base["cand"]
    loads = []
    real = A.load_causal_lm
    monkeypatch.setattr(A, "load_causal_lm", lambda p, *a, **k: (loads.append(p), real(p, *a, **k))[1])
    same, r = A.evaluate_answers([base, cand], base, n_prompts=4, gen=GEN, progress=False, cache_root=tmp_path,
                                 n_bootstrap=200)
    assert loads.count(base) == 2  # generate once, score itself once
    # the base against itself: zero up to float summation order (head applied to [A, H] vs [1, P + A, H])
    assert same.metrics["kld_mean"] < 1e-6 and same.metrics["top1"] == 1.0
    m = r.metrics
    assert m["kld_mean"] > 0 and m["tokens"] == sum(r.window_tokens) and r.windows == 4
    assert max(r.window_tokens) <= GEN.max_new_tokens
    assert m["kld_mean_ci_lo"] <= m["kld_mean"] <= m["kld_mean_ci_hi"]

    # the same figure by hand: teacher-forced logits of both models on the answer positions only
    s = A.read_answers(next(tmp_path.glob("answers-*")))
    mb, _ = real(base)
    mc, _ = real(cand)
    parts = []
    with torch.no_grad():
        for p, a in zip(s.prompts, s.answers):
            seq = torch.cat([p, a])[None]
            sl = slice(p.numel() - 1, -1)
            parts.append(token_stats(mb(input_ids=seq).logits[0, sl], mc(input_ids=seq).logits[0, sl], a))
    from lowbit.eval.metrics import TokenStats
    assert summarize(TokenStats.concat(parts))["kld_mean"] == pytest.approx(m["kld_mean"], rel=2e-3)

    loads.clear()
    again = A.evaluate_answers([cand], base, n_prompts=4, gen=GEN, progress=False, cache_root=tmp_path,
                               n_bootstrap=200)[0]
    assert loads == [cand], "the base was loaded again although its answers are cached"
    assert again.metrics == m
    other = A.evaluate_answers([cand], base, n_prompts=4, gen=A.GenerationConfig(max_new_tokens=5),
                               progress=False, cache_root=tmp_path, n_bootstrap=0)[0]
    assert max(other.window_tokens) <= 5 and len(list(tmp_path.glob("answers-*"))) == 2


def test_eval_cli_answers_feed_the_gate(chat_base, tmp_path, capsys):
    base, cand = chat_base["base"], chat_base["cand"]
    prompts = tmp_path / "p.txt"
    prompts.write_text("Name a colour.\nCount to three.\n")
    assert main(["-q", "eval", "--model-path", cand, "--base", base, "--no-text", "--answers", "--prompts",
                 str(prompts), "--max-new-tokens", "6", "--bootstrap", "50", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert "kld_mean" not in doc["results"][0] and doc["answers_prompts"] == str(prompts)
    ans = doc["results"][0]["answers"]
    assert ans["answers"] == 2 and ans["kld_mean"] > 0 and len(ans["window_kld_mean"]) == 2
    res = tmp_path / "ev.json"
    res.write_text(json.dumps(doc))
    assert main(["gate", str(res), "--max-kld", "1e-12"]) == 1
    assert "kld_mean (answers)" in capsys.readouterr().out
    assert main(["gate", str(res), "--max-kld", "10"]) == 0
