"""Task evaluation: item parsing, lm-eval-style log-likelihood scoring, exact match, drops and intervals."""
from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest
import torch

from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.eval import tasks as T
from lowbit.eval.evaluate import load_causal_lm


@pytest.fixture(autouse=True)
def _own_eval_cache(tmp_path, monkeypatch):
    """A cache of this test's own: base hidden states and answers cached by other tests (same tiny
    base, text and windows) must not change what this one loads, nor this one theirs."""
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "lowbit-cache"))


def test_demo_tasks_ship_with_the_package():
    items = T.load_tasks("demo")
    by = {}
    for it in items:
        by.setdefault(it.task, []).append(it)
    assert {k: len(v) for k, v in by.items()} == {"arithmetic": 15, "commonsense": 15, "capitals": 15,
                                                   "antonyms": 15}
    assert all(isinstance(i, T.ChoiceItem) for i in by["arithmetic"] + by["commonsense"])
    assert all(isinstance(i, T.ExactItem) for i in by["capitals"] + by["antonyms"])
    assert len({i.answer for i in by["arithmetic"]}) > 1, "the right answer should not always sit in one slot"
    assert len(T.load_tasks("demo", limit=2)) == 8


def test_item_parsing_and_errors(tmp_path):
    items = T.parse_items('{"context": "2+2=", "choices": ["4", "5"], "answer": "4"}\n'
                          '{"task": "x", "prompt": "Say hi:", "answer": ["hi", "hello"], "until": "."}\n', "f", "mine")
    assert items[0] == T.ChoiceItem("mine", "2+2=", ("4", "5"), 0)
    assert items[1] == T.ExactItem("x", "Say hi:", ("hi", "hello"), (".",), 16)
    for bad, msg in [('{"context": "c", "choices": ["a"], "answer": 0}', "at least two"),
                     ('{"context": "c", "choices": ["a", "b"], "answer": 2}', "index into choices"),
                     ('{"choices": ["a", "b"], "answer": 0}', "needs a \"context\""),
                     ('{"prompt": "p"}', "either"), ("[1, 2]", "not a JSON object"), ("{", "not valid JSON")]:
        with pytest.raises(LowbitError, match=msg):
            T.parse_items(bad, "f")
    f = tmp_path / "t.jsonl"
    f.write_text('{"context": "c", "choices": ["a", "b"], "answer": 1}\n')
    assert T.load_tasks(str(f))[0].task == "t"  # the file's stem
    with pytest.raises(LowbitError, match="not found"):
        T.load_tasks(str(tmp_path / "missing.jsonl"))


def test_lm_eval_task_names_without_lm_eval_say_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import fails, as on a machine without it
    monkeypatch.setitem(sys.modules, "lm_eval.tasks", None)
    with pytest.raises(LowbitError, match=r"hellaswag: .*pip install lm-eval.*local tasks \.jsonl"):
        T.load_tasks("hellaswag")


def test_lm_eval_tasks_convert_through_their_own_methods():
    docs = [{"q": "Sky colour?", "opts": ["green", "blue"], "gold": 1}, {"q": "Grass?", "opts": ["green", "red"],
                                                                          "gold": 0}]
    mc = SimpleNamespace(OUTPUT_TYPE="multiple_choice", config=SimpleNamespace(target_delimiter=" "),
                         has_test_docs=lambda: False, has_validation_docs=lambda: True, validation_docs=lambda: docs,
                         doc_to_text=lambda d: f"Q: {d['q']}\nA:", doc_to_choice=lambda d: d["opts"],
                         doc_to_target=lambda d: d["gold"])
    got = T.items_from_lm_eval_task("toy", mc, limit=1)
    assert got == [T.ChoiceItem("toy", "Q: Sky colour?\nA:", ("green", "blue"), 1, " ")]
    gen = SimpleNamespace(OUTPUT_TYPE="generate_until",
                          config=SimpleNamespace(target_delimiter=" ", generation_kwargs={"until": ["\n\n"]}),
                          has_test_docs=lambda: True, test_docs=lambda: docs, doc_to_text=lambda d: d["q"],
                          doc_to_target=lambda d: d["opts"][d["gold"]])
    assert T.items_from_lm_eval_task("g", gen)[1] == T.ExactItem("g", "Grass?", ("green",), ("\n\n",), 32)


def test_encode_pair_moves_trailing_spaces_like_lm_eval(tiny_llama):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    ctx, cont = T.encode_pair(tok, "The answer is ", "forty")
    assert ctx == tok("The answer is", add_special_tokens=False).input_ids
    assert ctx + cont == tok("The answer is forty", add_special_tokens=False).input_ids


def test_batched_choice_loglikelihoods_equal_one_sequence_at_a_time(tiny_llama):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model, _ = load_causal_lm(str(tiny_llama))
    item = T.ChoiceItem("t", "The whale swam into the", ("sea", "deep dark ocean", "a"), 0)
    got = T.choice_logliks(model, tok, item)
    for choice, ll in zip(item.choices, got):
        ctx, cont = T.encode_pair(tok, item.context, " " + choice)
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=torch.tensor([ctx + cont])).logits[0].float(), -1)
        assert ll == pytest.approx(sum(float(lp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont)), abs=1e-4)


class _Uniform(torch.nn.Module):
    """Every next token equally likely: a choice's log-likelihood is −(its tokens) · log V."""

    def forward(self, input_ids, attention_mask=None, **_):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, 384))


class _Scripted(torch.nn.Module):
    """Greedy output is a fixed token sequence (one per call), whatever the input."""

    def __init__(self, script: list[int]):
        super().__init__()
        self.script, self.calls = script, 0

    def forward(self, input_ids, past_key_values=None, use_cache=True, **_):
        logits = torch.zeros(1, input_ids.shape[1], 384)
        logits[0, -1, self.script[min(self.calls, len(self.script) - 1)]] = 1.0
        self.calls += 1
        return SimpleNamespace(logits=logits, past_key_values=None)


def test_acc_norm_divides_by_bytes_and_acc_does_not(tiny_llama):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    short, long_ = "zq", "the the the the"  # fewer tokens, but far fewer bytes per token in the long one?
    n_short = len(T.encode_pair(tok, "x:", " " + short)[1])
    n_long = len(T.encode_pair(tok, "x:", " " + long_)[1])
    assert n_short < n_long and n_short / len(short) > n_long / len(long_)
    item = T.ChoiceItem("t", "x:", (short, long_), 1)
    s = T.score_items(_Uniform(), tok, [item], progress=False)
    assert s.by_task["t"] == {"acc": [0.0], "acc_norm": [1.0]}


def test_exact_answers_are_cut_at_until_and_normalized(tiny_llama):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    script = tok(" The Paris.\nMore text", add_special_tokens=False).input_ids
    item = T.ExactItem("caps", "Q: capital of France?\nA:", ("paris",), ("\n",), 20)
    assert T.greedy_answer(_Scripted(script), tok, item).strip() == "The Paris."
    assert T.normalize_answer("  The  Paris. ") == "paris" == T.normalize_answer("paris")
    assert T.score_items(_Scripted(script), tok, [item], progress=False).by_task["caps"]["exact_match"] == [1.0]
    wrong = T.ExactItem("caps", "Q:", ("lyon",), ("\n",), 20)
    assert T.score_items(_Scripted(script), tok, [wrong], progress=False).by_task["caps"]["exact_match"] == [0.0]
    eos = T.ExactItem("caps", "Q:", ("x",), ("\n",), 20)  # end of sequence ends the answer
    assert T.greedy_answer(_Scripted([tok.eos_token_id]), tok, eos) == ""


def test_task_figures_drop_and_paired_interval():
    base, cand = T.ItemScores(), T.ItemScores()
    for i in range(20):
        base.add("a", "choice", acc=1.0, acc_norm=1.0)
        cand.add("a", "choice", acc=float(i >= 4), acc_norm=1.0)  # 4 of 20 lost
        base.add("g", "exact", exact_match=float(i % 2))
        cand.add("g", "exact", exact_match=float(i % 2))
    f = T.task_figures(base, cand, n_bootstrap=500)
    a = f["a"]
    assert a["metric"] == "acc" and a["base"] == 1.0 and a["score"] == 0.8 and a["drop"] == pytest.approx(0.2)
    assert 0 < a["drop_ci_lo"] < 0.2 < a["drop_ci_hi"] <= 0.45 and a["acc_norm"] == 1.0
    g = f["g"]  # same items right and wrong: the paired interval collapses, the score's does not
    assert g["metric"] == "exact_match" and g["drop"] == 0 and g["drop_ci_lo"] == g["drop_ci_hi"] == 0
    assert g["score_ci_lo"] < 0.5 < g["score_ci_hi"]
    with pytest.raises(LowbitError, match="mixes"):
        base.add("a", "exact", exact_match=1.0)


def test_eval_cli_tasks_for_base_and_candidate(tiny_llama, tmp_path, capsys):
    f = tmp_path / "mini.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in [
        {"task": "mc", "context": "The sea is", "choices": ["blue", "loud", "a"], "answer": 0},
        {"task": "mc", "context": "One, two,", "choices": ["three", "cat"], "answer": 0},
        {"task": "ex", "prompt": "Say yes:", "answer": "yes", "max_tokens": 3}]) + "\n")
    src = str(tiny_llama)
    assert main(["-q", "eval", "--model-path", src, "--base", src, "--no-text", "--tasks", str(f),
                 "--bootstrap", "50", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc["base_tasks"]) == {"mc", "ex"} and doc["tasks_source"] == str(f)
    rows = doc["results"][0]["tasks"]
    assert rows["mc"]["n"] == 2 and rows["ex"]["n"] == 1 and rows["mc"]["metric"] == "acc"
    assert all(r["drop"] == 0 and r["score"] == doc["base_tasks"][t] for t, r in rows.items())  # base vs itself
    res = tmp_path / "ev.json"
    res.write_text(json.dumps(doc))
    assert main(["gate", str(res), "--max-task-drop", "1%", "--use-ci"]) == 0
    assert "task mc drop (95% CI bound)" in capsys.readouterr().out
    assert main(["-q", "eval", "--model-path", src, "--base", src, "--no-text", "--tasks", str(f)]) == 0
    assert "drop = base − candidate" in capsys.readouterr().out
