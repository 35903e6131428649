"""Serving figures through lowbit's runtime path, and the three gates of seed 004 on them."""
from __future__ import annotations

import json

import pytest

import lowbit
from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.eval import serving as S
from lowbit.eval.gate import gate, parse_ms, thresholds_from_dict

CFG = S.ServingConfig(prompt_tokens=16, new_tokens=6, repeats=2)


@pytest.fixture(autouse=True)
def _own_eval_cache(tmp_path, monkeypatch):
    """A cache of this test's own: base hidden states and answers cached by other tests (same tiny
    base, text and windows) must not change what this one loads, nor this one theirs."""
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "lowbit-cache"))


@pytest.fixture(scope="module")
def packed(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    src = tiny_models["llama"]
    return {"src": str(src),
            "ct": str(lowbit.quantize(src, root / "ct", bits=4, group_size=32, n_calib=4, seq_len=32, progress=False)),
            "fake": str(lowbit.quantize(src, root / "fake", bits=4, group_size=32, export_format="fake", n_calib=4,
                                        seq_len=32, progress=False))}


def test_each_format_runs_on_its_runtime_path(packed):
    from lowbit.kernels import QuantLinear
    import torch
    m, runtime = S.load_for_serving(packed["ct"], "cpu", torch.float32)
    assert runtime.startswith("lowbit.load") and any(isinstance(x, QuantLinear) for x in m.modules())
    m, runtime = S.load_for_serving(packed["fake"], "cpu", torch.float32)
    assert runtime == "transformers" and not any(isinstance(x, QuantLinear) for x in m.modules())


def test_measure_in_process(packed):
    base = S.measure(packed["src"], CFG)
    ct = S.measure(packed["ct"], CFG)
    for f in (base, ct):
        assert f.prefill_tokens_per_s > 0 and f.decode_tokens_per_s > 0 and 0 < f.p50_ms <= f.p95_ms
        assert f.memory_bytes > f.weights_bytes > 0 and f.device == "cpu" and f.new_tokens == 6
    assert ct.weights_bytes < 0.7 * base.weights_bytes  # packed int4 codes, not dequantized copies
    j = ct.to_json()
    assert j["tokens_per_s"] == ct.decode_tokens_per_s and j["memory_kind"] == "process peak RSS"
    with pytest.raises(LowbitError, match="serving dtype"):
        S.measure(packed["src"], S.ServingConfig(dtype="fp12"))


def test_isolated_bench_reports_its_own_process(packed):
    f = S.bench(packed["ct"], CFG, isolate=True)
    assert f.runtime.startswith("lowbit.load") and f.memory_bytes > 50 * 2**20 and f.p95_ms > 0
    with pytest.raises(LowbitError, match="failed"):
        S.bench(packed["ct"] + "-missing", CFG, isolate=True)
    with pytest.raises(LowbitError, match="at least 1"):
        S.bench(packed["ct"], S.ServingConfig(new_tokens=0))


def test_eval_cli_serving_then_gate(packed, tmp_path, capsys):
    assert main(["-q", "eval", "--model-path", packed["ct"], "--base", packed["src"], "--no-text", "--serving",
                 "--serving-prompt", "8", "--serving-new-tokens", "4", "--serving-repeats", "1",
                 "--serving-in-process", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["base_serving"]["runtime"] == "transformers"
    sv = doc["results"][0]["serving"]
    assert sv["runtime"].startswith("lowbit.load") and sv["decode_tokens_per_s"] > 0
    res = tmp_path / "ev.json"
    res.write_text(json.dumps(doc))
    assert main(["gate", str(res), "--min-tokens-per-s", "0.1", "--max-p95-latency", "60s", "--max-memory",
                 "1TiB"]) == 0
    capsys.readouterr()
    assert main(["gate", str(res), "--min-tokens-per-s", "1e9", "--max-p95-latency", "1us",
                 "--min-prefill-tokens-per-s", "1e12", "--max-memory", "1MiB"]) == 1
    out = capsys.readouterr().out
    assert "FAIL (4 of 4 checks)" in out and "tokens_per_s" in out and "p95_ms" in out and "memory" in out


# -- the gate on all three kinds of figure --------------------------------------------------------
ROW = {"model": "cand", "kld_mean": 0.01, "kld_mean_ci_hi": 0.03, "top1": 0.97, "ppl": 10.2, "ppl_base": 10.0,
       "tasks": {"arith": {"metric": "acc", "score": 0.60, "base": 0.605, "drop": 0.005, "drop_ci_hi": 0.04}},
       "serving": {"tokens_per_s": 40.0, "prefill_tokens_per_s": 900.0, "p95_ms": 30.0, "memory_bytes": 2 * 2**30}}


def test_parse_ms():
    assert parse_ms("50ms") == 50 and parse_ms("0.05s") == pytest.approx(50) and parse_ms("50") == 50
    assert parse_ms(12) == 12 and parse_ms("500us") == pytest.approx(0.5)
    with pytest.raises(LowbitError, match="50ms"):
        parse_ms("fast")


def test_three_gates_from_yaml(tmp_path, capsys):
    y = tmp_path / "gate.yaml"
    y.write_text("max_kld: 0.02\nmin_top1: 0.95\nmax_ppl_increase: 3%\n"
                 "max_task_drop: 1%\nmin_tokens_per_s: 30\nmax_p95_latency: 50ms\nmax_memory: 8GiB\n")
    res = tmp_path / "r.json"
    res.write_text(json.dumps(ROW))
    assert main(["gate", str(res), "--thresholds", str(y), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {c["gate"] for c in doc["verdicts"][0]["checks"]} == {"drift", "tasks", "serving"}
    assert len(doc["verdicts"][0]["checks"]) == 7
    assert main(["gate", str(res), "--thresholds", str(y), "--use-ci"]) == 1  # KLD bound 0.03, drop bound 4 pts
    out = capsys.readouterr().out
    assert "kld_mean (95% CI bound) 0.03 > max 0.02" in out and "task arith drop (95% CI bound) 4.00 pts" in out


def test_thresholds_for_serving():
    th = thresholds_from_dict({"max_p95_latency": "0.02s", "min_prefill_tokens_per_s": 1000})
    assert th.max_p95_ms == pytest.approx(20)
    failed = {c.name for c in gate(ROW, th).failures}
    assert failed == {"p95_ms", "prefill_tokens_per_s"}
