"""The core pipeline on tiny random models of every family."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import lowbit
from lowbit.errors import LowbitError
from lowbit.eval.evaluate import load_causal_lm
from conftest import ALL_FAMILIES

QUICK = dict(n_calib=4, seq_len=32, progress=False)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_rtn_compressed_tensors_reload_matches_fake(family, tiny_models, tmp_path):
    src = tiny_models[family]
    ct = lowbit.quantize(src, tmp_path / "ct", bits=4, group_size=32, **QUICK)
    fake = lowbit.quantize(src, tmp_path / "fake", bits=4, group_size=32, export_format="fake", **QUICK)
    ids = torch.randint(3, 300, (2, 24))
    m_ct, _ = load_causal_lm(str(ct))
    m_fake, _ = load_causal_lm(str(fake))
    base = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        l_ct, l_fake, l_base = (m(input_ids=ids).logits for m in (m_ct, m_fake, base))
    torch.testing.assert_close(l_ct, l_fake, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(l_fake, l_base, atol=1e-3), "quantization changed nothing"
    meta = json.loads((ct / "lowbit.json").read_text())
    assert meta["recipe"]["method"] == "rtn" and meta["checksums"]["model.safetensors"]


def test_symmetric_output_loads_in_plain_transformers(tiny_llama, tmp_path):
    out = lowbit.quantize(tiny_llama, tmp_path / "sym", bits=4, group_size=32, sym=True, **QUICK)
    model = AutoModelForCausalLM.from_pretrained(out)
    fake = lowbit.quantize(tiny_llama, tmp_path / "fake", bits=4, group_size=32, sym=True,
                           export_format="fake", **QUICK)
    ids = torch.randint(3, 300, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits,
                                   AutoModelForCausalLM.from_pretrained(fake)(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)


def test_input_model_untouched_and_output_refused_twice(tiny_llama, tmp_path):
    before = {f.name: f.read_bytes() for f in tiny_llama.iterdir() if f.is_file()}
    out = lowbit.quantize(tiny_llama, tmp_path / "o", group_size=32, **QUICK)
    after = {f.name: f.read_bytes() for f in tiny_llama.iterdir() if f.is_file()}
    assert before == after
    with pytest.raises(LowbitError, match="already exists"):
        lowbit.quantize(tiny_llama, out, group_size=32, **QUICK)
    lowbit.quantize(tiny_llama, out, group_size=32, overwrite=True, **QUICK)


def test_quantize_lm_head_in_chunks(tiny_llama, tmp_path):
    out = lowbit.quantize(tiny_llama, tmp_path / "o", group_size=32, quantize_lm_head=True,
                          lmhead_chunks=3, export_format="fake", **QUICK)
    whole = lowbit.quantize(tiny_llama, tmp_path / "w", group_size=32, quantize_lm_head=True,
                            lmhead_chunks=1, export_format="fake", **QUICK)
    from safetensors.torch import load_file
    a, b = load_file(out / "model.safetensors"), load_file(whole / "model.safetensors")
    torch.testing.assert_close(a["lm_head.weight"], b["lm_head.weight"])  # RTN is row-wise
    src = load_file(tiny_llama / "model.safetensors")["lm_head.weight"]
    assert not torch.equal(a["lm_head.weight"], src)


@pytest.mark.parametrize("bits,sym,group", [(2, False, 32), (3, True, 64), (8, False, 0), (4, True, 0)])
def test_bit_widths_and_granularities(bits, sym, group, tiny_llama, tmp_path):
    out = lowbit.quantize(tiny_llama, tmp_path / "o", bits=bits, sym=sym, group_size=group, **QUICK)
    ct = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]["weights"]
    assert (ct["num_bits"], ct["symmetric"], ct["strategy"]) == (bits, sym, "group" if group else "channel")
    m, _ = load_causal_lm(str(out))
    assert torch.isfinite(m(input_ids=torch.randint(3, 300, (1, 8))).logits).all()


def test_layer_selection(tiny_llama, tmp_path):
    from safetensors.torch import load_file
    out = lowbit.quantize(tiny_llama, tmp_path / "o", group_size=32, layers="1", export_format="fake", **QUICK)
    a, src = load_file(out / "model.safetensors"), load_file(tiny_llama / "model.safetensors")
    k0, k1 = "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(a[k0], src[k0]) and not torch.equal(a[k1], src[k1])
