"""Integration on the real SmolLM2-135M (fetched by `lowbit fetch smollm2-135m`; CI fetches it first)."""
from __future__ import annotations

import json
import os

import pytest
import torch

import lowbit
from lowbit.eval.evaluate import load_causal_lm
from conftest import smollm2_dir

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smollm2():
    d = smollm2_dir()
    if d is None:
        if os.environ.get("LOWBIT_REQUIRE_REAL"):
            pytest.fail("SmolLM2 is not fetched; run `lowbit fetch smollm2-135m`")
        pytest.skip("SmolLM2 not fetched (run `lowbit fetch smollm2-135m`)")
    return d


@pytest.fixture(scope="module")
def rtn_outputs(smollm2, tmp_path_factory):
    root = tmp_path_factory.mktemp("smol")
    ct = lowbit.quantize(smollm2, root / "ct", bits=4, group_size=64, progress=False)
    fake = lowbit.quantize(smollm2, root / "fake", bits=4, group_size=64, export_format="fake", progress=False)
    return ct, fake


def test_compressed_tensors_reload_matches_fake_quant(rtn_outputs):
    ct, fake = rtn_outputs
    ids = torch.randint(100, 40000, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = load_causal_lm(str(ct))[0](input_ids=ids).logits
        b = load_causal_lm(str(fake))[0](input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)


def test_rtn_kld_in_expected_range(rtn_outputs, smollm2):
    ct, _ = rtn_outputs
    res = lowbit.evaluate(str(ct), str(smollm2), text="moby-dick", ctx=512, n_windows=4, progress=False)
    m = res.metrics
    # RTN W4 g64 on SmolLM2 (measured over 40 windows: KLD 0.32, top-1 68%, ppl 46.2 -> 57.9)
    assert 0.1 < m["kld_mean"] < 0.8, m
    assert 0.55 < m["top1"] < 0.85, m
    assert m["ppl"] > m["ppl_base"]
    assert 20 < m["ppl_base"] < 100, m


def test_output_is_smaller_and_documented(rtn_outputs, smollm2):
    ct, _ = rtn_outputs
    meta = json.loads((ct / "lowbit.json").read_text())
    assert meta["recipe"]["scheme"] == {"format": "int", "bits": 4, "group_size": 64, "sym": False}
    src = (smollm2 / "model.safetensors").stat().st_size
    assert (ct / "model.safetensors").stat().st_size < 0.4 * src
    assert meta["peak_memory"]["rss_bytes"] > 0 and meta["timings"]["total_s"] > 0
