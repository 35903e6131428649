"""Bad input and faults: one-line errors, untouched inputs, no half-written outputs, resume."""
from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lowbit
from lowbit import pipeline
from lowbit.errors import LowbitError

QUICK = dict(n_calib=4, seq_len=32, progress=False)


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lowbit", "-q", *args], capture_output=True, text=True)


def test_missing_model_path_cli_one_line(tmp_path):
    r = _cli("quantize", "--model-path", str(tmp_path / "nope"), "--output-dir", str(tmp_path / "o"))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "does not exist" in r.stderr
    assert not (tmp_path / "o").exists()


def test_group_size_must_divide(tiny_llama, tmp_path):
    with pytest.raises(LowbitError, match="group size 48 does not divide in_features 64"):
        lowbit.quantize(tiny_llama, tmp_path / "o", group_size=48, **QUICK)
    assert not (tmp_path / "o").exists()


def test_nan_weights_are_refused(tiny_llama, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in tiny_llama.iterdir():
        if f.suffix != ".safetensors":
            (bad / f.name).write_bytes(f.read_bytes())
    sd = load_file(tiny_llama / "model.safetensors")
    sd["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(sd, bad / "model.safetensors")
    with pytest.raises(LowbitError, match=r"model\.layers\.1\.mlp\.down_proj\.weight contains NaN"):
        lowbit.quantize(bad, tmp_path / "o", group_size=32, **QUICK)
    assert not (tmp_path / "o").exists()


def test_pickled_weights_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(LowbitError, match="never unpickles"):
        lowbit.quantize(tmp_path, tmp_path / "o", **QUICK)


def test_disk_full_is_one_line_and_leaves_no_output(tiny_llama, tmp_path, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(pipeline, "save_layer", full)
    with pytest.raises(LowbitError, match="disk full"):
        lowbit.quantize(tiny_llama, tmp_path / "o", group_size=32, **QUICK)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("export_format,fmt,match", [
    ("compressed-tensors", "nf4", "holds int formats, not 'nf4'"),
    ("gptq", "fp8_e4m3", "GPTQ checkpoints hold int formats"),
    ("autoawq", "nf4", "AutoAWQ GEMM holds 4-bit int"),
    ("gguf", "int", "writes GGUF block types"),
])
def test_exporter_that_cannot_store_the_format_refuses_before_calibrating(tiny_llama, tmp_path, monkeypatch,
                                                                         export_format, fmt, match):
    def never(*a, **k):
        raise AssertionError("calibration ran before the export format was checked")
    monkeypatch.setattr(pipeline, "_calibration_batches", never)
    with pytest.raises(LowbitError, match=match):
        lowbit.quantize(tiny_llama, tmp_path / "o", method="awq", fmt=fmt, export_format=export_format,
                        group_size=32, **QUICK)
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_exporters_refuse_a_format_they_cannot_store_when_called_too(tmp_path):
    """The registry's exporters check the format themselves (for callers other than the pipeline)."""
    from types import SimpleNamespace

    from lowbit.export import get_exporter
    from lowbit.formats import make_format
    from lowbit.spec import QuantScheme
    nf4 = make_format(QuantScheme(format="nf4", bits=4, group_size=64))
    with pytest.raises(LowbitError, match="holds int formats, not 'nf4'"):
        get_exporter("compressed-tensors")(SimpleNamespace(fmt=nf4), tmp_path)
    assert not any(tmp_path.iterdir())


def test_too_little_free_space_refused_upfront(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline.shutil, "disk_usage", lambda p: type("U", (), {"free": 10})())
    with pytest.raises(LowbitError, match="not enough disk space"):
        lowbit.quantize(tiny_llama, tmp_path / "o", group_size=32, **QUICK)


def test_killed_run_resumes_to_identical_output(tiny_llama, tmp_path, monkeypatch):
    ref = lowbit.quantize(tiny_llama, tmp_path / "ref", group_size=32, **QUICK)
    real = pipeline._quantize_one_layer

    def dies_at_layer_1(*args):
        if args[-3] == 1:  # (model, method, fmt, batches, split, i, layers_dir, writer)
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(pipeline, "_quantize_one_layer", dies_at_layer_1)
    out = tmp_path / "o"
    with pytest.raises(KeyboardInterrupt):
        lowbit.quantize(tiny_llama, out, group_size=32, **QUICK)
    assert not out.exists() and (tmp_path / "o.partial" / "layers" / "00000.safetensors").is_file()
    monkeypatch.setattr(pipeline, "_quantize_one_layer", real)
    with pytest.raises(LowbitError, match="recipe differs in scheme"):
        lowbit.quantize(tiny_llama, out, group_size=64, resume=True, **QUICK)
    lowbit.quantize(tiny_llama, out, group_size=32, resume=True, **QUICK)
    a, b = load_file(ref / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_without_partial_is_refused(tiny_llama, tmp_path):
    with pytest.raises(LowbitError, match="nothing to resume"):
        lowbit.quantize(tiny_llama, tmp_path / "o", group_size=32, resume=True, **QUICK)


def test_hub_id_goes_through_snapshot_download(tiny_llama, tmp_path, monkeypatch):
    import huggingface_hub
    calls = []

    def fake_snapshot(repo_id, allow_patterns=None, **kw):
        calls.append((repo_id, allow_patterns))
        return str(tiny_llama)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    out = lowbit.quantize("someorg/tiny-llama", tmp_path / "o", group_size=32, **QUICK)
    assert calls[0][0] == "someorg/tiny-llama" and "*.safetensors" in calls[0][1]
    assert not any(p.endswith(".bin") for p in calls[0][1])
    assert (out / "model.safetensors").is_file()


def test_hub_unreachable_is_clear(tmp_path, monkeypatch):
    import huggingface_hub

    def offline(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(LowbitError, match="could not download someorg/x"):
        lowbit.quantize("someorg/x", tmp_path / "o", **QUICK)


def test_unknown_method_and_option(tiny_llama, tmp_path):
    with pytest.raises(LowbitError, match="unknown method 'nope'"):
        lowbit.quantize(tiny_llama, tmp_path / "o", method="nope", **QUICK)
    with pytest.raises(LowbitError, match="has no option"):
        lowbit.quantize(tiny_llama, tmp_path / "o", method="rtn", bogus=1, **QUICK)


def test_background_plan_writer_writes_and_reports_failures(tmp_path):
    """GPU runs write layer plans in a thread: the file must land whole, and a failed write must not
    vanish with the thread (it is raised at the next write or at close)."""
    from lowbit.formats import QParams, QuantizedTensor
    from lowbit.formats.int import IntFormat
    from lowbit.plan import load_layer
    fmt = IntFormat(bits=4, group_size=32, sym=False)
    qt = fmt.encode(torch.randn(8, 64))
    writer = pipeline._PlanWriter(background=True)
    writer.save(tmp_path / "00000.safetensors", {"l.q": qt}, {}, {"loss": 1.0})
    writer.close()
    back = load_layer(tmp_path / "00000.safetensors", fmt)[0]["l.q"]
    assert torch.equal(back.W_q, qt.W_q) and torch.equal(back.qparams.scale, qt.qparams.scale.float())
    writer = pipeline._PlanWriter(background=True)
    writer.save(tmp_path / "missing-dir" / "00001.safetensors", {"l.q": QuantizedTensor(qt.W_q, QParams(
        qt.qparams.scale, qt.qparams.zero), fmt)}, {}, {})
    with pytest.raises(Exception):
        writer.close()
