"""`lowbit compare`: two quantized models of one base (dh-awq vs awq), outputs and weights."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.eval import pair as P
from lowbit.eval.compare import evaluate_many

QUICK = dict(bits=4, group_size=32, n_calib=4, seq_len=32, progress=False)
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _own_eval_cache(tmp_path, monkeypatch):
    """A cache of this test's own: base hidden states and answers cached by other tests (same tiny
    base, text and windows) must not change what this one loads, nor this one theirs."""
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "lowbit-cache"))


@pytest.fixture(scope="module")
def pair(tiny_models, tmp_path_factory):
    src = tiny_models["llama"]
    root = tmp_path_factory.mktemp("compare")
    return {"src": str(src),
            "dh": str(lowbit.quantize(src, root / "dh", method="dh-awq", **QUICK)),
            "awq": str(lowbit.quantize(src, root / "awq", method="awq", **QUICK)),
            "fake": str(lowbit.quantize(src, root / "fake", export_format="fake", **QUICK))}


def test_weight_diff_counts_codes_scales_and_relative_difference():
    W = torch.randn(8, 16)
    codes = torch.randint(-8, 8, (8, 16))
    scale = torch.rand(8, 2)
    same = P.weight_diff(W, W.clone(), codes, codes.clone(), scale, scale.clone())
    assert same == {"rel_diff": 0.0, "max_abs_diff": 0.0, "code_diff": 0.0, "scale_diff": 0.0}
    c2, s2, W2 = codes.clone(), scale.clone(), W.clone()
    c2[3, 5] += 1
    s2[0, 1] *= 2
    W2[3, 5] += 0.5
    d = P.weight_diff(W2, W, c2, codes, s2, scale)
    assert d["code_diff"] == 1 / 128 and d["scale_diff"] == 1 / 16
    assert d["rel_diff"] == pytest.approx(0.5 / float(W.norm()), rel=1e-6) and d["max_abs_diff"] == pytest.approx(0.5)
    assert P.weight_diff(W, W)["code_diff"] is None
    with pytest.raises(LowbitError, match="shape mismatch"):
        P.weight_diff(W, W[:4])


def test_rounding_stats_read_dh_awq_logs():
    meta = {"layer_stats": {"00001": {"rounding": {"mlp.down_proj": {"flips": 7, "outlier_pct": 1.5, "knee": 0.1}},
                                      "groups": {}}, "bad": {}}}
    assert P.rounding_stats(meta) == {"model.layers.1.mlp.down_proj.weight":
                                      {"flips": 7.0, "outlier_pct": 1.5, "knee": 0.1}}
    assert P.rounding_stats(None) == {} == P.rounding_stats({"layer_stats": {"00000": {"groups": {}}}})


def test_a_model_against_itself_differs_nowhere(pair):
    rep = P.compare_pair(pair["dh"], pair["dh"], ctx=32, n_windows=3, progress=False, n_bootstrap=50)
    assert all(r.code_diff == 0 and r.rel_diff == 0 and r.scale_diff == 0 for r in rep.linears)
    bt = rep.between
    assert bt["kld_a_b"] == 0 and bt["top1_a_b"] == 1 and bt["kld_diff"] == 0 == bt["kld_diff_ci_lo"]
    assert rep.base == pair["src"]  # from A's lowbit.json


def test_dh_awq_against_awq(pair):
    rep = P.compare_pair(pair["dh"], pair["awq"], pair["src"], ctx=32, n_windows=4, progress=False,
                         n_bootstrap=100)
    assert len(rep.linears) == 14 and [r["layer"] for r in rep.layers] == [0, 1]
    assert any(r.code_diff and r.code_diff > 0 for r in rep.linears) and any(r.rel_diff > 0 for r in rep.linears)
    meta = json.loads((Path(pair["dh"]) / "lowbit.json").read_text())
    logged = sum(r["flips"] for st in meta["layer_stats"].values() for r in st.get("rounding", {}).values())
    assert logged > 0 and sum(r["flips_a"] for r in rep.layers) == logged
    assert all(r["flips_b"] is None for r in rep.layers)  # standard AWQ logs no flips
    # the figures against the base are the ones `lowbit eval` gives
    ev = {r.model: r.metrics for r in evaluate_many([pair["dh"], pair["awq"]], pair["src"], ctx=32, n_windows=4,
                                                    progress=False, n_bootstrap=0)}
    for key, path in (("a", pair["dh"]), ("b", pair["awq"])):
        for fig in ("kld_mean", "ppl", "top1"):
            assert rep.models[key][fig] == pytest.approx(ev[path][fig], rel=1e-5), (key, fig)
    bt = rep.between
    assert bt["kld_diff"] == pytest.approx(rep.models["a"]["kld_mean"] - rep.models["b"]["kld_mean"], rel=1e-6)
    assert bt["kld_diff_ci_lo"] <= bt["kld_diff"] <= bt["kld_diff_ci_hi"] and bt["kld_a_b"] > 0
    text = P.format_pair(rep)
    assert "flips A" in text and "KLD(base‖A) − KLD(base‖B)" in text
    assert P.plot_pair(rep).startswith(PNG)


def test_float_checkpoints_have_no_codes(pair):
    rep = P.compare_pair(pair["fake"], pair["awq"], n_windows=0)
    assert rep.models == {} and all(r.code_diff is None for r in rep.linears)
    assert P.plot_pair(rep).startswith(PNG)


def test_compare_cli(pair, tmp_path, capsys):
    out = tmp_path / "plots" / "dh-vs-awq"
    assert main(["-q", "compare", "--heuristic-path", pair["dh"], "--standard-path", pair["awq"], "--base",
                 pair["src"], "--n-samples", "3", "--ctx", "32", "--bootstrap", "50", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "codes ≠" in printed and f"plot: {out}.png" in printed
    assert (tmp_path / "plots" / "dh-vs-awq.png").read_bytes().startswith(PNG)
    saved = json.loads((tmp_path / "plots" / "dh-vs-awq.json").read_text())
    assert saved["windows"] == 3 and saved["between"]["kld_a_b"] > 0
    assert main(["-q", "compare", "--heuristic-path", pair["dh"], "--standard-path", pair["awq"], "--n-samples",
                 "0", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["models"] == {} and len(doc["linears"]) == 14 and doc["layers"][0]["flips_a"] > 0
    assert main(["compare", "--heuristic-path", pair["dh"], "--standard-path", pair["src"] + "-none",
                 "--n-samples", "0"]) == 2
