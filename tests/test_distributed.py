"""torchrun with 2 gloo processes on CPU gives the single-process output: bit for bit for RTN,
AWQ and AWQ-joint, GPTQ within float reduction-order noise (its Hessians are all-reduced sums).

One torchrun launch (tests/_dist_worker.py) quantizes with every method; the references run here
on one thread, as torchrun's workers do (OMP_NUM_THREADS=1): a CPU matmul's rounding may depend
on the thread count, so bitwise claims hold for equal thread counts.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import build_tiny_model
from lowbit.api import quantize
from lowbit.distributed import assign

# 10 windows in batches of 2: 5 batches, 3 on rank 0 and 2 on rank 1. AWQ's search sees the first 3
# of 16-token windows: 96 tokens, fewer than down_proj's 128 inputs, whose tokens are then kept
# (stacked over both ranks) instead of its H.
CALIB = dict(n_calib=10, calib_batch_size=2, seq_len=64, group_size=32)
RUNS = {
    "rtn": dict(method="rtn", **CALIB),
    "awq": dict(method="awq", search_tokens=96, **{**CALIB, "seq_len": 16}),
    "awq-joint": dict(method="awq-joint", **CALIB),  # candidates (α, clip) split over processes
    # dequantized: codes and grids in one number; float32 Hessians, which processes always use (GPTQ.hessian_view)
    "gptq": dict(method="gptq", export_format="fake", hessian_dtype="model", **CALIB),
}
# GPTQ: per tensor, the share of weights that moved by more than 1e-3 of the tensor's largest (a code
# flipped). Reduction-order noise moves grids by ulps and may flip a rare code; other data flips many.
GPTQ_MAX_FLIPPED = 0.01


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _flipped(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() > 1e-3 * a.abs().max()).float().mean())


def _one_thread(model: Path, out: Path, calib: str, **kwargs) -> Path:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return quantize(str(model), str(out), calib_dataset=calib, progress=False, **kwargs)
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_tokenizer_dir, calib_text) -> tuple[Path, Path, Path, str]:
    root = tmp_path_factory.mktemp("dist")
    model = build_tiny_model("llama", root / "llama", tiny_tokenizer_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(Path(__file__).with_name("_dist_worker.py")), str(model), calib_text, str(root / "two")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # collectives that never match: SIGTERM lets torchrun stop its workers
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        pytest.fail("torchrun workers did not finish in 120 s (mismatched collectives?)")
    assert proc.returncode == 0, stdout[-3000:] + stderr[-5000:]
    return model, root / "two", root / "one", calib_text


@pytest.mark.parametrize("name", ["rtn", "awq", "awq-joint"])
def test_two_processes_bitwise(name, runs):
    model, two, one, calib = runs
    _one_thread(model, one / name, calib, **RUNS[name])
    assert not (two / f"{name}.partial").exists()
    files = ["config.json", *(p.name for p in (one / name).glob("*.safetensors"))]
    assert len(files) > 1
    for f in files:
        assert (one / name / f).read_bytes() == (two / name / f).read_bytes(), f


def test_two_processes_gptq_within_noise(runs):
    model, two, one, calib = runs
    _one_thread(model, one / "gptq", calib, **RUNS["gptq"])
    _one_thread(model, one / "gptq-seed1", calib, seed=1, **RUNS["gptq"])  # other calibration windows
    ref, got, other = (_tensors(d) for d in (one / "gptq", two / "gptq", one / "gptq-seed1"))
    assert ref.keys() == got.keys()
    linears = [k for k in ref if k.endswith("_proj.weight")]
    assert len(linears) == 14
    for k in ref.keys() - set(linears):
        assert torch.equal(ref[k], got[k]), k
    worst = max(_flipped(ref[k], got[k]) for k in linears)
    assert worst <= GPTQ_MAX_FLIPPED, f"2-process GPTQ moved {worst:.1%} of a tensor's weights"
    # the comparison has teeth: a Hessian from other windows moves far more weights than the noise
    assert min(_flipped(ref[k], other[k]) for k in linears) > 10 * GPTQ_MAX_FLIPPED


def test_assign_balances_and_is_deterministic():
    cost = {"down": 10.0, "gate_up": 8.0, "qkv": 3.0, "o": 2.0}
    owner = assign(list(cost), cost.__getitem__, 2)
    assert owner == {"down": 0, "gate_up": 1, "qkv": 1, "o": 0}
    assert owner == assign(list(cost), cost.__getitem__, 2)
    assert set(assign(list(cost), cost.__getitem__, 1).values()) == {0}
