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


@pytest.mark.parametrize("exact_channels", [0, None])
def test_gptq_bf16_hessians_need_no_extra_dampening(smollm2, tmp_path, monkeypatch, exact_channels):
    """Layer 0's o_proj input is nearly singular: from 16-bit products alone (no exact channels) its
    H + 1% dampening is not positive definite and GPTQ retries at 10%, which doubles that linear's loss;
    the float32 rows of the loudest channels (gptq.HessianSum) keep every H factorizable as asked."""
    import lowbit.algorithms.gptq as gptq_mod
    if exact_channels is not None:
        monkeypatch.setattr(gptq_mod, "EXACT_CHANNELS", exact_channels)
    out = lowbit.quantize(smollm2, tmp_path / "g", method="gptq", group_size=64, layers="0", n_calib=32,
                          export_format="fake", progress=False, hessian_dtype="bfloat16")
    retried = json.loads((out / "lowbit.json").read_text())["layer_stats"]["00000"].get("damp", {})
    if exact_channels == 0:
        assert "self_attn.o_proj" in retried
    else:
        assert not retried
