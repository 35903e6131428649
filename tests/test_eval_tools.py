"""Evaluation tools on tiny random models: many-candidate eval with a base-logit cache and window
bootstrap, inspect, size, gate and recommend."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

import lowbit
from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.eval import compare
from lowbit.eval.bootstrap import WindowSums, bootstrap_ci, point_estimates, window_sums
from lowbit.eval.cache import cache_key, checkpoint_hash, kld_storage_error
from lowbit.eval.gate import Thresholds, gate, parse_percent, thresholds_from_dict
from lowbit.eval.inspect import CheckpointReader, inspect_checkpoint, sort_errors, tensor_error
from lowbit.eval.metrics import token_stats
from lowbit.eval.recommend import Needs, parse_hardware, recommend
from lowbit.eval.size import (kv_cache_bytes, model_shape, parse_bytes, parse_scheme, safetensors_file_bytes,
                              weight_size)
from conftest import build_tiny_model

QUICK = dict(n_calib=4, seq_len=32, progress=False)
EVAL = dict(ctx=32, n_windows=4, progress=False)


@pytest.fixture(scope="module")
def outputs(tiny_models, tmp_path_factory) -> dict:
    """RTN int4 g32 of the tiny llama, as compressed-tensors and as fake-quant."""
    src = tiny_models["llama"]
    root = tmp_path_factory.mktemp("eval-tools")
    return {"src": src,
            "ct": lowbit.quantize(src, root / "ct", bits=4, group_size=32, **QUICK),
            "fake": lowbit.quantize(src, root / "fake", bits=4, group_size=32, export_format="fake", **QUICK)}


def _stored_data_bytes(path) -> tuple[int, set[str]]:
    """Bytes of tensor data (no header) and tensor names in one safetensors file."""
    tensors = load_file(path)
    return sum(t.numel() * t.element_size() for t in tensors.values()), set(tensors)


# -- eval: many candidates, cache, bootstrap ----------------------------------------------------
def test_evaluate_many_matches_evaluate_and_reuses_the_cache(outputs, monkeypatch):
    src, fake = str(outputs["src"]), str(outputs["fake"])
    loaded = []
    real_load = compare.load_causal_lm
    monkeypatch.setattr(compare, "load_causal_lm", lambda p, *a, **k: (loaded.append(p), real_load(p, *a, **k))[1])

    same, cand = compare.evaluate_many([src, fake], src, n_bootstrap=200, **EVAL)
    assert loaded.count(src) == 2  # once for the cache, once as a candidate
    assert same.metrics["kld_mean"] == 0 and same.metrics["top1"] == 1.0
    ref = lowbit.evaluate(fake, src, **EVAL).metrics
    for k in ("kld_mean", "kld_p99", "top1", "ppl", "ppl_base", "rms_delta_p"):
        assert cand.metrics[k] == pytest.approx(ref[k], rel=1e-6, abs=1e-12), k
    m = cand.metrics
    assert m["kld_mean"] > 0
    assert m["kld_mean_ci_lo"] <= m["kld_mean"] <= m["kld_mean_ci_hi"] and m["kld_mean_ci_lo"] < m["kld_mean_ci_hi"]
    assert m["top1_ci_lo"] <= m["top1"] <= m["top1_ci_hi"]
    assert m["ppl_ci_lo"] <= m["ppl"] <= m["ppl_ci_hi"]

    loaded.clear()
    again = compare.evaluate_many([fake], src, n_bootstrap=200, **EVAL)[0]
    assert loaded == [fake], "the base was loaded again although its logits are cached"
    assert again.metrics == m


def test_no_cache_touches_no_disk_and_agrees(outputs, tmp_path, monkeypatch):
    src, fake = str(outputs["src"]), str(outputs["fake"])
    r = compare.evaluate_many([fake], src, use_cache=False, cache_root=tmp_path / "c", n_bootstrap=0, **EVAL)[0]
    assert r.metrics["kld_mean"] > 0 and "kld_mean_ci_lo" not in r.metrics
    assert not (tmp_path / "c").exists()
    cached = compare.evaluate_many([fake], src, cache_root=tmp_path / "c", n_bootstrap=0, **EVAL)[0]
    assert cached.metrics == r.metrics
    monkeypatch.setattr(compare.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1, 1, 0))
    with pytest.raises(LowbitError, match="--no-cache"):
        compare.evaluate_many([fake], src, cache_root=tmp_path / "d", **EVAL)


def test_eval_cli_lists_every_candidate(outputs, capsys):
    src, ct, fake = (str(outputs[k]) for k in ("src", "ct", "fake"))
    assert main(["-q", "eval", "--model-path", ct, fake, "--base", src, "--ctx", "32", "--n-windows", "3",
                 "--bootstrap", "100", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [r["model"] for r in doc["results"]] == [ct, fake]
    for r in doc["results"]:
        assert sum(r["kld_histogram"]["counts"]) == r["tokens"] == 3 * 31
        assert len(r["window_kld_mean"]) == 3 and r["kld_mean_ci_hi"] >= r["kld_mean"]
    assert doc["results"][0]["kld_mean"] == pytest.approx(doc["results"][1]["kld_mean"], rel=1e-5)
    assert doc["results"][0]["size_bytes"] < doc["results"][1]["size_bytes"]
    assert "kld_mean" not in doc  # several candidates: figures only per result
    assert main(["-q", "eval", "--model-path", ct, "--base", src, "--ctx", "32", "--n-windows", "3", "--json"]) == 0
    one = json.loads(capsys.readouterr().out)
    assert one["model"] == ct and one["kld_mean"] == one["results"][0]["kld_mean"]  # the single-model shape


def test_cache_key_follows_base_content_text_and_windows(tiny_llama, tmp_path):
    copy = shutil.copytree(tiny_llama, tmp_path / "m")
    memo = tmp_path / "memo.json"
    h = checkpoint_hash(copy, memo)
    assert checkpoint_hash(copy, memo) == h == checkpoint_hash(tiny_llama)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5 if cfg.get("rms_norm_eps") != 1e-5 else 1e-6
    (copy / "config.json").write_text(json.dumps(cfg))
    assert checkpoint_hash(copy, memo) != h
    w = torch.arange(64).reshape(2, 32)
    k = cache_key(h, "t", 32, w)
    assert k == cache_key(h, "t", 32, w.clone())
    assert len({k, cache_key("other", "t", 32, w), cache_key(h, "u", 32, w), cache_key(h, "t", 32, w + 1),
                cache_key(h, "t", 32, w[:1])}) == 5


@pytest.mark.parametrize("scale,noise", [(5.0, 0.02), (3.0, 0.05)])
def test_fp16_log_probs_would_break_the_kld_requirement(scale, noise):
    """Why the cache stores float32: compact log-prob storage misses the < 1e-4 relative KLD bar."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 4096, generator=g) * scale
    cand = base + noise * scale * torch.randn(64, 4096, generator=g)
    assert kld_storage_error(base, cand, torch.float32) < 1e-5
    assert kld_storage_error(base, cand, torch.float16) > 1e-4
    assert kld_storage_error(base, cand, torch.bfloat16) > 1e-3


# -- bootstrap (pure) ---------------------------------------------------------------------------
def _sums(values_per_window: list[list[float]]) -> WindowSums:
    k = torch.tensor([v for w in values_per_window for v in w])
    T = k.numel()
    lb = torch.zeros(T, 3)
    stats = token_stats(lb, lb, torch.zeros(T, dtype=torch.long))
    stats.kld = k
    return window_sums(stats, [len(w) for w in values_per_window])


def test_bootstrap_resamples_windows_not_tokens():
    g = torch.Generator().manual_seed(1)
    window_means = torch.rand(20, generator=g).tolist()
    w = _sums([[m] * 50 for m in window_means])           # tokens identical inside a window
    per_token = _sums([[m] for m in window_means for _ in range(50)])  # as if tokens were independent
    lo, hi = bootstrap_ci(w, 500)["kld_mean"]
    tlo, thi = bootstrap_ci(per_token, 500)["kld_mean"]
    assert lo < point_estimates(w)["kld_mean"] < hi
    assert (hi - lo) > 4 * (thi - tlo), "window resampling must not shrink like token resampling"


def test_bootstrap_of_identical_windows_collapses_and_is_seeded():
    w = _sums([[0.1, 0.3]] * 8)
    lo, hi = bootstrap_ci(w, 100)["kld_mean"]
    assert lo == pytest.approx(0.2) and hi == pytest.approx(0.2)
    v = _sums([[0.1], [0.5], [0.2], [0.9]])
    assert bootstrap_ci(v, 100, seed=3) == bootstrap_ci(v, 100, seed=3) != bootstrap_ci(v, 100, seed=4)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_bootstrap_takes_stats_from_any_device(device):
    g = torch.Generator().manual_seed(2)
    lb, lc = torch.randn(40, 7, generator=g), torch.randn(40, 7, generator=g)
    ids = torch.randint(0, 7, (40,), generator=g)
    on_cpu = window_sums(token_stats(lb, lc, ids), [10] * 4)
    on_dev = window_sums(token_stats(lb.to(device), lc.to(device), ids.to(device)), [10] * 4)
    dev, cpu = bootstrap_ci(on_dev, 50), bootstrap_ci(on_cpu, 50)
    assert dev.keys() == cpu.keys()
    assert all(dev[k] == pytest.approx(cpu[k], rel=1e-5) for k in cpu)


# -- inspect ------------------------------------------------------------------------------------
def test_inspect_of_the_source_against_itself_is_exact(tiny_llama):
    errors = inspect_checkpoint(str(tiny_llama), str(tiny_llama))
    assert len(errors) == len(load_file(tiny_llama / "model.safetensors"))
    assert all(e.cos == 1.0 and e.rel_rms == 0.0 and e.max_abs == 0.0 for e in errors)


def test_inspect_fake_and_packed_outputs_show_the_same_error(outputs):
    fake = {e.name: e for e in inspect_checkpoint(str(outputs["fake"]))}  # source from lowbit.json
    ct = {e.name: e for e in inspect_checkpoint(str(outputs["ct"]), str(outputs["src"]))}
    assert fake.keys() == ct.keys()
    linears = [n for n in ct if ct[n].stored == "pack-quantized"]
    assert len(linears) == 2 * 7
    for n in linears:
        assert ct[n].cos < 1 and 0 < ct[n].rel_rms < 0.2 and ct[n].bits_per_weight < 6
        assert ct[n].rel_rms == pytest.approx(fake[n].rel_rms, rel=1e-9)
        assert fake[n].bits_per_weight == 32
    for n in set(ct) - set(linears):  # embeddings, norms, lm_head are untouched
        assert ct[n].cos == 1.0 and ct[n].max_abs == 0


@pytest.mark.parametrize("bits,sym,group", [(4, False, 32), (3, True, 64), (8, False, 0), (2, True, 32)])
def test_packed_decode_equals_fake_quant(bits, sym, group, tiny_llama, tmp_path):
    kw = dict(bits=bits, sym=sym, group_size=group, **QUICK)
    ct = lowbit.quantize(tiny_llama, tmp_path / "ct", **kw)
    fake = load_file(lowbit.quantize(tiny_llama, tmp_path / "fake", export_format="fake", **kw) / "model.safetensors")
    reader = CheckpointReader(ct)
    packed = [n for n in reader.names() if reader.stored(n) == "pack-quantized"]
    assert packed
    for n in packed:
        assert torch.equal(reader.get(n), fake[n]), n


def test_gptq_decode_equals_fake_quant(tiny_llama, tmp_path):
    from lowbit.export import EXPORTERS
    if "gptq" not in EXPORTERS:
        pytest.skip("no gptq exporter registered")
    kw = dict(bits=4, sym=True, group_size=32, **QUICK)
    out = lowbit.quantize(tiny_llama, tmp_path / "gptq", export_format="gptq", **kw)
    fake = load_file(lowbit.quantize(tiny_llama, tmp_path / "fake", export_format="fake", **kw) / "model.safetensors")
    reader = CheckpointReader(out)
    packed = [n for n in reader.names() if reader.stored(n) == "gptq"]
    assert packed
    for n in packed:
        torch.testing.assert_close(reader.get(n), fake[n], rtol=1e-3, atol=1e-6)  # GPTQ v1 stores fp16 scales


def test_tensor_error_counts_outliers_and_sees_small_changes():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(128, 128, generator=g)
    W[3, 5], W[7, 1] = 40.0, -35.0
    e = tensor_error(W, W.clone())
    assert e["outliers"] == 2 and e["cos"] == 1.0 and e["rel_rms"] == 0
    W_r = W.clone()
    W_r[0, 0] += 1e-3
    e = tensor_error(W, W_r)
    assert e["cos"] < 1 and e["max_abs"] == pytest.approx(1e-3, rel=1e-3) and e["rel_rms"] > 0
    norm = 1 + 0.1 * torch.randn(64, generator=g)
    assert tensor_error(norm, norm)["outliers"] == 0  # centred on its mean, not on zero
    with pytest.raises(LowbitError, match="shape"):
        tensor_error(W, W[:2])


def test_inspect_cli_sorts_worst_first(outputs, capsys):
    assert main(["-q", "inspect", str(outputs["fake"]), "--sort", "cos", "--changed-only", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["tensors"]
    assert len(rows) == 14 and [r["cos"] for r in rows] == sorted(r["cos"] for r in rows)
    assert main(["-q", "inspect", str(outputs["ct"]), "--sort", "rel_rms", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "pack-quantized" in out and len(out.strip().splitlines()) == 3 + 3
    errs = inspect_checkpoint(str(outputs["fake"]))
    assert [e.max_abs for e in sort_errors(errs, "max_abs")] == sorted((e.max_abs for e in errs), reverse=True)


# -- size ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits,group,sym,lm_head", [(4, 32, False, False), (8, 0, True, False),
                                                    (2, 32, False, True), (3, 64, True, False)])
def test_size_matches_the_files_lowbit_writes(bits, group, sym, lm_head, tiny_llama, tmp_path):
    out = lowbit.quantize(tiny_llama, tmp_path / "o", bits=bits, group_size=group, sym=sym,
                          quantize_lm_head=lm_head, **QUICK)
    ws = weight_size(model_shape(str(tiny_llama)), parse_scheme(f"int{bits}-g{group}{'-sym' if sym else ''}"),
                     quantize_lm_head=lm_head)
    data, names = _stored_data_bytes(out / "model.safetensors")
    assert {t.name for t in ws.tensors} == names
    assert ws.total_bytes == data
    actual = (out / "model.safetensors").stat().st_size
    assert abs(safetensors_file_bytes(ws.tensors) - actual) <= 0.01 * actual


def test_size_of_tied_embeddings_with_quantized_lm_head(tiny_tokenizer_dir, tmp_path):
    src = build_tiny_model("llama", tmp_path / "tied", tiny_tokenizer_dir, tie_word_embeddings=True)
    out = lowbit.quantize(src, tmp_path / "o", bits=4, group_size=32, quantize_lm_head=True, **QUICK)
    ws = weight_size(model_shape(str(src)), parse_scheme("int4-g32"), quantize_lm_head=True)
    data, names = _stored_data_bytes(out / "model.safetensors")
    assert ws.total_bytes == data and {t.name for t in ws.tensors} == names


def test_size_from_config_only_equals_size_from_weights(tiny_llama, tmp_path):
    (tmp_path / "config.json").write_text((tiny_llama / "config.json").read_text())
    from_cfg, from_dir = model_shape(str(tmp_path / "config.json")), model_shape(str(tiny_llama))
    assert from_cfg.params == from_dir.params
    for s in ("fp16", "int4-g32", "int8-g0-sym"):
        assert weight_size(from_cfg, parse_scheme(s)).total_bytes == weight_size(from_dir, parse_scheme(s)).total_bytes
    fp32 = weight_size(from_dir, parse_scheme("fp32")).total_bytes
    assert fp32 == _stored_data_bytes(tiny_llama / "model.safetensors")[0]


def test_registered_formats_are_sized_by_bits_per_weight(tiny_llama, monkeypatch):
    from lowbit import formats
    from lowbit.formats.int import IntFormat

    class Half(IntFormat):  # a stand-in format: 4.5 bits per weight, no declared layout
        name = "half"

        def bits_per_weight(self, in_features: int) -> float:
            return 4.5

    monkeypatch.setitem(formats.FORMATS, "half", Half)
    shape = model_shape(str(tiny_llama))
    ws = weight_size(shape, parse_scheme("half4-g32"))
    lin = sum(t.numel for t in shape.tensors if t.role == "linear")
    assert ws.quantized_bytes == sum(math.ceil(4.5 * t.numel / 8) for t in shape.tensors if t.role == "linear")
    assert ws.linear_bpw == pytest.approx(4.5, rel=1e-3) and ws.quantized_params == lin and not ws.exact_layout
    from lowbit.eval.size import default_schemes
    assert any(s.format == "half" for s in default_schemes())


def test_kv_cache_and_units():
    # the guide's example: 32 layers, 8 kv heads, head dim 128, fp16, batch 32 × 8192 tokens = 32 GiB
    assert kv_cache_bytes(32, 8, 128, 8192, 32, 2) == 32 * 2**30
    assert kv_cache_bytes(32, 8, 128, 8192, 32, 1) == 16 * 2**30
    assert parse_bytes("24GiB") == 24 * 2**30 and parse_bytes("8GB") == 8 * 10**9 and parse_bytes("512 MiB") == 2**29
    with pytest.raises(LowbitError):
        parse_bytes("lots")


def test_size_cli_fits_and_refuses_bad_groups(tiny_llama, capsys):
    assert main(["-q", "size", str(tiny_llama), "--gpu-mem", "1MiB", "--ctx", "64", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    rows = {r["scheme"]: r for r in doc["rows"]}
    assert rows["int4-g128"]["weights_bytes"] is None and "does not divide" in rows["int4-g128"]["note"]
    assert rows["fp32"]["fits"] is True and rows["fp32"]["kv_bytes"] == 2 * 2 * 2 * 16 * 64 * 2
    assert main(["-q", "size", str(tiny_llama), "--scheme", "int4-g32", "--gpu-mem", "100KiB", "--ctx", "64",
                 "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["rows"][0]
    assert row["fits"] is False and row["max_ctx"] == 0
    assert main(["-q", "size", str(tiny_llama), "--group-size", "32", "--gpu-mem", "24GiB"]) == 0
    assert "int2-g32" in capsys.readouterr().out


# -- gate ---------------------------------------------------------------------------------------
GOOD = {"model": "awq-4bit", "kld_mean": 0.012, "kld_mean_ci_hi": 0.025, "top1": 0.96, "ppl": 10.1,
        "ppl_base": 10.0, "tasks": {"gsm8k": {"base": 0.93, "score": 0.925}},
        "serving": {"tokens_per_s": 900, "p95_ms": 49, "memory_gib": 4.1}}
BAD = {"model": "aggressive-3bit", "kld_mean": 0.031, "top1": 0.91, "ppl": 10.6, "ppl_base": 10.0,
       "tasks": {"gsm8k": 0.85}, "base_tasks": {"gsm8k": 0.93}, "serving": {"memory_bytes": 9 * 2**30}}
TH = dict(max_kld=0.02, min_top1=0.95, max_ppl_increase="3%", max_task_drop="1%", max_memory="8GiB")


def test_gate_passes_good_and_fails_bad_with_amounts():
    th = thresholds_from_dict(TH)
    assert gate(GOOD, th).passed
    v = gate(BAD, th)
    failed = {c.name: c for c in v.failures}
    assert set(failed) == {"kld_mean", "top1", "ppl_increase", "task gsm8k drop", "memory"}
    assert "over by 0.011" in failed["kld_mean"].detail
    assert failed["ppl_increase"].value == pytest.approx(0.06)
    assert failed["task gsm8k drop"].value == pytest.approx(0.08) and "8.00 pts" in failed["task gsm8k drop"].detail
    assert "short by 0.0400" in failed["top1"].detail


def test_gate_fails_what_was_not_measured_and_can_judge_the_interval():
    v = gate({"model": "x", "kld_mean": 0.001}, Thresholds(max_kld=0.02, max_task_drop=0.01, max_p95_ms=50))
    assert [c.name for c in v.failures] == ["task scores", "p95_ms"]
    assert all("not measured" in c.detail for c in v.failures)
    assert gate(GOOD, Thresholds(max_kld=0.02)).passed
    assert not gate(GOOD, Thresholds(max_kld=0.02, use_ci=True)).passed  # the upper bound 0.025 is over
    per_task = thresholds_from_dict({"tasks": {"gsm8k": "0.4%"}})
    assert not gate(GOOD, per_task).passed


def test_threshold_parsing_refuses_ambiguity():
    assert parse_percent("3%", "x") == pytest.approx(0.03) and parse_percent("0.03", "x") == 0.03
    with pytest.raises(LowbitError, match="ambiguous"):
        parse_percent("3", "max_ppl_increase")
    with pytest.raises(LowbitError, match="unknown"):
        thresholds_from_dict({"max_kdl": 0.1})


def test_gate_cli_exit_status_yaml_and_json(tmp_path, capsys):
    res = tmp_path / "results.json"
    res.write_text(json.dumps({"base": "b", "results": [GOOD, BAD]}))
    assert main(["gate", str(res), "--max-kld", "0.02", "--min-top1", "0.95", "--max-ppl-increase", "3%",
                 "--max-task-drop", "1%", "--max-memory", "8GiB"]) == 1
    out = capsys.readouterr().out
    assert "aggressive-3bit: FAIL (5 of 5 checks)" in out and "approved: awq-4bit" in out
    yml = tmp_path / "gate.yaml"
    yml.write_text("max_kld: 0.02\nmax_ppl_increase: 3%\nmax_memory: 8GiB\n")
    one = tmp_path / "one.json"
    one.write_text(json.dumps(GOOD))
    assert main(["gate", str(one), "--thresholds", str(yml), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["passed"] and len(doc["verdicts"][0]["checks"]) == 3
    assert main(["gate", str(one), "--thresholds", str(yml), "--max-kld", "0.001"]) == 1
    assert main(["gate", str(one)]) == 2  # no thresholds at all is an error, not a pass


def test_gate_reads_real_eval_output(outputs, tmp_path, capsys):
    src, ct = str(outputs["src"]), str(outputs["ct"])
    assert main(["-q", "eval", "--model-path", src, ct, "--base", src, "--ctx", "32", "--n-windows", "3",
                 "--bootstrap", "50", "--json"]) == 0
    res = tmp_path / "ev.json"
    res.write_text(capsys.readouterr().out)
    assert main(["gate", str(res), "--max-kld", "1e-9", "--min-top1", "0.999"]) == 1
    out = capsys.readouterr().out
    assert f"{src}: PASS" in out and f"{ct}: FAIL" in out


# -- recommend ----------------------------------------------------------------------------------
def _needs(params: float, kv: int = 0, layers: int = 1) -> Needs:
    from lowbit.eval.commands import needs_from_params
    n, _ = needs_from_params(int(params))
    return Needs({k: v + kv for k, v in n.total.items()}, kv, layers)


def test_decision_guide():
    gib = 2**30
    cpu = recommend("llama.cpp", parse_hardware("cpu"), 32 * gib, _needs(8e9))
    assert cpu.format.startswith("GGUF Q8_0") and cpu.fits
    laptop = recommend("vllm", parse_hardware("Apple M3"), 16 * gib, _needs(8e9))
    assert laptop.runtime == "llama.cpp" and laptop.format.startswith("GGUF")
    big = recommend("vllm", parse_hardware("RTX 4090"), int(21.6 * gib), _needs(70e9))
    assert "partial offload" in big.format and not big.fits and big.runtime == "llama.cpp"
    fp8 = recommend("vllm", parse_hardware("H100"), 72 * gib, _needs(8e9))
    assert fp8.format.startswith("FP8")
    no_fp8 = recommend("vllm", parse_hardware("A100"), 72 * gib, _needs(8e9))
    assert no_fp8.format.startswith("bf16")
    int4 = recommend("vllm", parse_hardware("RTX 3090"), int(21.6 * gib), _needs(34e9), methods=("rtn", "gptq"))
    assert "int4" in int4.format and int4.method == "gptq" and int4.fits and "--bits 4" in int4.command
    assert recommend("vllm", parse_hardware("RTX 3090"), int(21.6 * gib), _needs(34e9),
                     methods=("rtn", "gptq", "awq")).method == "awq"
    int8 = recommend("transformers", parse_hardware("A100-40GB"), 36 * gib, _needs(34e9))
    assert "int8" in int8.format
    kv = recommend("vllm", parse_hardware("H100"), 72 * gib, _needs(8e9, kv=40 * gib))
    assert any("fp8 KV cache" in n for n in kv.notes)
    with pytest.raises(LowbitError, match="runtime"):
        recommend("tensorrt-magic", parse_hardware("H100"), gib, _needs(1e9))


def test_hardware_table():
    h = parse_hardware("NVIDIA GeForce RTX 4090")
    assert (h.kind, h.memory, h.fp8) == ("gpu", 24 * 2**30, True)
    assert parse_hardware("A100-40GB").memory == 40 * 2**30 and not parse_hardware("A100").fp8
    assert parse_hardware("4090").memory == 24 * 2**30
    assert parse_hardware("cpu").kind == "cpu" and parse_hardware("Apple M2 Max").kind == "apple"


def test_recommend_cli(tiny_llama, capsys):
    assert main(["recommend", "--runtime", "vllm", "--hardware", "H100", "--params", "8B", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["format"].startswith("FP8")
    assert main(["recommend", "--runtime", "llama.cpp", "--hardware", "cpu", "--memory", "1MiB",
                 "--model", str(tiny_llama)]) == 0
    assert "GGUF" in capsys.readouterr().out
    assert main(["recommend", "--runtime", "vllm", "--hardware", "mystery-gpu", "--params", "8B"]) == 2
