"""The AutoAWQ GEMM exporter, checked by a decoder written from AutoAWQ's documented layout."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig

import lowbit
from lowbit.errors import LowbitError
from lowbit.export import ExportContext, get_exporter
from lowbit.formats import QParams, QuantizedTensor
from lowbit.formats.int import IntFormat
from lowbit.model.arch import family_for
from lowbit.model.source import WeightStore
from lowbit.plan import Plan, save_layer
from conftest import build_tiny_model

QUICK = dict(n_calib=4, seq_len=32, progress=False, group_size=32)


def decode_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """AutoAWQ GEMM -> W [out, in] (float32).

    Each int32 word covers 8 consecutive output channels; its 4-bit field i (bits 4i..4i+3) holds
    channel 8c + [0, 2, 4, 6, 1, 3, 5, 7][i]. qweight is [in, out/8], qzeros [in/g, out/8] and
    scales [in/g, out]; W = (q − z) · s.
    """
    order = [0, 2, 4, 6, 1, 3, 5, 7]

    def unpack(words):
        bits = words.to(torch.int64) & 0xFFFFFFFF
        out = torch.empty(words.shape[0], words.shape[1] * 8, dtype=torch.int64)
        for i, channel in enumerate(order):
            out[:, channel::8] = (bits >> (4 * i)) & 0xF
        return out

    q, z = unpack(qweight), unpack(qzeros)
    group = q.shape[0] // z.shape[0]
    z = z.repeat_interleave(group, dim=0)
    s = scales.float().repeat_interleave(group, dim=0)
    return ((q.float() - z.float()) * s).T


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory):
    """A slice of the default calibration text: tokenizing all of it would dominate the test."""
    from lowbit.data import load_text
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text(load_text("default").text[:20_000])
    return str(p)


@pytest.fixture(scope="module")
def fp16_llama(tmp_path_factory, tiny_tokenizer_dir):
    return build_tiny_model("llama", tmp_path_factory.mktemp("fp16") / "llama", tiny_tokenizer_dir,
                            dtype=torch.float16)


def _random_plan(model_dir, tmp_path, fmt):
    """A plan with random codes, zeros and float16-exact scales for every linear of every layer."""
    store = WeightStore(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    family = family_for(config)
    g = torch.Generator().manual_seed(0)
    layers = tmp_path / "layers"
    layers.mkdir()
    by_layer: dict[str, dict] = {}
    for name in store.keys():
        if name.startswith(family.layers) and "proj" in name and name.endswith(".weight"):
            out_f, in_f = store.shape(name)
            G = in_f // fmt.group_length(in_f)
            qt = QuantizedTensor(torch.randint(0, 16, (out_f, in_f), generator=g).to(torch.uint8),
                                 QParams((torch.rand(out_f, G, generator=g) * 0.1 + 1e-3).half().float(),
                                         torch.randint(0, 16, (out_f, G), generator=g).float()), fmt)
            by_layer.setdefault(name.split(".")[2], {})[name.removesuffix(".weight")] = qt
    for i, qts in by_layer.items():
        save_layer(layers / f"{int(i):05d}.safetensors", qts, {}, {})
    return ExportContext(store=store, config=config, family=family, plan=Plan(layers, fmt), fmt=fmt,
                         dtype=torch.float16)


@pytest.mark.parametrize("group_size", [32, 0])
def test_decoded_autoawq_equals_the_plan(tiny_llama, tmp_path, group_size):
    fmt = IntFormat(bits=4, group_size=group_size)
    ctx = _random_plan(tiny_llama, tmp_path, fmt)
    out = tmp_path / "out"
    out.mkdir()
    get_exporter("autoawq")(ctx, out)
    tensors = load_file(out / "model.safetensors")
    paths = ctx.plan.quantized_paths
    assert paths and not any(p + ".weight" in tensors for p in paths)
    for path, qt in ctx.plan.items():
        t = {k: tensors[f"{path}.{k}"] for k in ("qweight", "qzeros", "scales")}
        out_f, in_f = qt.W_q.shape
        G = 1 if group_size == 0 else in_f // group_size
        assert (t["qweight"].dtype, tuple(t["qweight"].shape)) == (torch.int32, (in_f, out_f // 8))
        assert (t["qzeros"].dtype, tuple(t["qzeros"].shape)) == (torch.int32, (G, out_f // 8))
        assert (t["scales"].dtype, tuple(t["scales"].shape)) == (torch.float16, (G, out_f))
        assert torch.equal(decode_awq(**t), qt.dequantize()), path
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert {k: qc[k] for k in ("quant_method", "version", "bits", "group_size", "zero_point")} == {
        "quant_method": "awq", "version": "gemm", "bits": 4, "group_size": group_size or -1, "zero_point": True}
    assert "lm_head" in qc["modules_to_not_convert"]


def test_first_word_bit_layout():
    """Codes 0..7 in output channels 0..7 of one input row pack to nibbles 0,2,4,6,1,3,5,7."""
    from lowbit.export.autoawq import convert
    fmt = IntFormat(bits=4, group_size=0)
    qt = QuantizedTensor(torch.arange(8, dtype=torch.uint8)[:, None], QParams(torch.ones(8, 1), torch.zeros(8, 1)), fmt)
    word = int(convert(qt)["qweight"][0, 0]) & 0xFFFFFFFF
    assert [(word >> (4 * i)) & 0xF for i in range(8)] == [0, 2, 4, 6, 1, 3, 5, 7]


def test_awq_pipeline_to_autoawq_matches_fake_export(fp16_llama, calib_text, tmp_path):
    kw = dict(method="awq", n_grid=4, calib_dataset=calib_text, **QUICK)
    awq = lowbit.quantize(fp16_llama, tmp_path / "awq", export_format="autoawq", **kw)
    fake = lowbit.quantize(fp16_llama, tmp_path / "fake", export_format="fake", **kw)
    a, f = load_file(awq / "model.safetensors"), load_file(fake / "model.safetensors")
    for key, W in f.items():
        path = key.removesuffix(".weight")
        if f"{path}.qweight" in a:
            W_r = decode_awq(a[f"{path}.qweight"], a[f"{path}.qzeros"], a[f"{path}.scales"])
            assert torch.equal(W_r.to(torch.float16), W), key
        else:
            assert torch.equal(a[key], W), key  # folded norms, embeddings, lm_head


def test_autoawq_refuses_what_it_cannot_hold(tiny_llama, tmp_path):
    with pytest.raises(LowbitError, match="4-bit"):
        lowbit.quantize(tiny_llama, tmp_path / "a", bits=3, export_format="autoawq", **QUICK)
    with pytest.raises(LowbitError, match="lm_head"):
        lowbit.quantize(tiny_llama, tmp_path / "b", quantize_lm_head=True, export_format="autoawq", **QUICK)
    out = lowbit.quantize(tiny_llama, tmp_path / "c", layers="1", export_format="autoawq", **QUICK)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["modules_to_not_convert"] == ["lm_head", "model.layers.0"]
