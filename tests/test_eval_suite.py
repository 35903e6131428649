"""One eval JSON for text, answers, tasks and serving; the legacy `evaluate`; the report's new sections."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import lowbit
from lowbit.eval import compare
from lowbit.eval.report import load_candidates, render_markdown, serving_rows, task_rows
from lowbit.eval.serving import ServingFigures
from lowbit.eval.suite import suite_json
from lowbit.eval.tasks import TaskReport


@pytest.fixture(autouse=True)
def _own_eval_cache(tmp_path, monkeypatch):
    """A cache of this test's own: base hidden states and answers cached by other tests (same tiny
    base, text and windows) must not change what this one loads, nor this one theirs."""
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "lowbit-cache"))


def test_legacy_evaluate_is_evaluate_many_without_disk(tiny_llama, monkeypatch):
    src = str(tiny_llama)
    cand = lowbit.quantize(src, Path(os.environ["LOWBIT_CACHE"]).parent / "legacy-rtn", bits=4, group_size=32,
                           n_calib=4, seq_len=32, progress=False)
    assert not (Path(os.environ["LOWBIT_CACHE"]) / "eval").exists()
    calls = []
    real = compare.evaluate_many
    monkeypatch.setattr(compare, "evaluate_many", lambda *a, **k: (calls.append(k), real(*a, **k))[1])
    r = lowbit.evaluate(str(cand), src, ctx=32, n_windows=3, progress=False)
    assert len(calls) == 1 and calls[0]["use_cache"] is False
    assert not (Path(os.environ["LOWBIT_CACHE"]) / "eval").exists()
    ref = real([str(cand)], src, ctx=32, n_windows=3, progress=False, use_cache=False)[0]
    assert r.metrics == ref.metrics and r.windows == 3 and r.metrics["kld_mean"] > 0


def _fig(model: str, tps: float) -> ServingFigures:
    return ServingFigures(model, "lowbit.load (QuantLinear dequantize on CPU)", "cpu", "float32", 8, 4, 100.0, tps,
                          1.0, 2.0, 2**30, 2**20, 2)


def test_suite_json_shapes_and_report_sections(tmp_path):
    tasks = TaskReport("demo", "B", {"arith": 0.5},
                       {"c1": {"arith": {"metric": "acc", "n": 4, "score": 0.25, "score_ci_lo": 0.0,
                                         "score_ci_hi": 0.75, "base": 0.5, "drop": 0.25, "drop_ci_lo": 0.0,
                                         "drop_ci_hi": 0.5}},
                        "c2": {"arith": {"metric": "acc", "n": 4, "score": 0.5, "score_ci_lo": 0.0,
                                         "score_ci_hi": 1.0, "base": 0.5, "drop": 0.0, "drop_ci_lo": 0.0,
                                         "drop_ci_hi": 0.0}}})
    doc = suite_json(["c1", "c2"], "B", tasks=tasks, serving=(_fig("B", 50.0), [_fig("c1", 40.0), _fig("c2", 45.0)]))
    assert doc["base_tasks"] == {"arith": 0.5} and doc["base_serving"]["tokens_per_s"] == 50.0
    assert [r["model"] for r in doc["results"]] == ["c1", "c2"] and "tasks" not in doc
    assert doc["results"][1]["serving"]["decode_tokens_per_s"] == 45.0
    one = suite_json(["c1"], "B", tasks=tasks)
    assert one["model"] == "c1" and one["tasks"]["arith"]["drop"] == 0.25  # one candidate: also at the top
    f = tmp_path / "ev.json"
    f.write_text(json.dumps(doc))
    _, cands = load_candidates([f])
    head, rows = task_rows(cands)
    assert rows[0][:2] == ["c1", "arith"] and rows[0][-1] == "+25.0 [+0.0, +50.0]"
    head, rows = serving_rows(cands)
    assert [r[0] for r in rows] == ["base", "c1", "c2"] and rows[1][4] == "40.0"
    md = render_markdown("t", {}, cands, {}, "now")
    assert "## Tasks" in md and "## Serving" in md and "## KLD on the base's own answers" not in md


@pytest.mark.parametrize("missing", ["tasks", "serving"])
def test_report_leaves_out_what_was_not_measured(tmp_path, missing):
    row = {"model": "c", "kld_mean": 0.1, "tasks": {"t": {"metric": "acc", "score": 1, "base": 1, "drop": 0}},
           "serving": {"decode_tokens_per_s": 3}}
    row.pop(missing)
    f = tmp_path / "ev.json"
    f.write_text(json.dumps(row))
    _, cands = load_candidates([f])
    md = render_markdown("t", {}, cands, {}, "now")
    assert ("## Tasks" in md) == (missing != "tasks") and ("## Serving" in md) == (missing != "serving")
