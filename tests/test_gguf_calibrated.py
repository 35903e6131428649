"""Calibrated GGUF: `lowbit quantize --weight-format gguf:Q4_K_M --format gguf` gives every linear the
preset's own block type (with llama-quantize's per-tensor fallback), methods quantize each linear on
its own grid, the plan records each tensor's format, and calibration E[x²] reaches the encoders as
their imatrix."""
from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch

import lowbit
from lowbit.algorithms import make_method
from lowbit.errors import LowbitError
from lowbit.export import gguf as gexp
from lowbit.formats.gguf import GGUF_FORMATS, GGUFFormat
from lowbit.formats.int import IntFormat
from lowbit.formats.map import FormatMap, per_linear
from lowbit.model.layer import LayerData
from lowbit.model.stream import StreamedModel
from lowbit.plan import Plan, save_layer

from conftest import build_tiny_model, make_tiny_config

# Rows of 96 cannot hold K-quants (Q4_K -> Q5_0, Q6_K -> Q8_0), down_proj's rows of 256 can; with two
# layers llama.cpp's Q4_K_M gives layer 1 (≥ 7n/8) the higher types.
SHAPES = dict(hidden_size=96, intermediate_size=256, head_dim=24, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=512)
EXPECTED = {  # linear -> (layer 0, layer 1) block type under Q4_K_M
    "self_attn.q_proj": ("q5_0", "q5_0"), "self_attn.k_proj": ("q5_0", "q5_0"),
    "self_attn.v_proj": ("q5_0", "q8_0"), "self_attn.o_proj": ("q5_0", "q5_0"),
    "mlp.gate_proj": ("q5_0", "q5_0"), "mlp.up_proj": ("q5_0", "q5_0"), "mlp.down_proj": ("q4_k", "q6_k"),
}
GGUF_NAME = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}


@pytest.fixture(scope="module")
def mixed_model(tmp_path_factory, tiny_tokenizer_dir):
    return build_tiny_model("qwen2", tmp_path_factory.mktemp("mixed") / "qwen2", tiny_tokenizer_dir, **SHAPES)


def _tensors(path):
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def test_linear_formats_follow_the_preset_and_fall_back_per_tensor():
    config = make_tiny_config("qwen2", **SHAPES)
    fm = gexp.linear_formats(config, "gguf:Q4_K_M")
    for n, types in EXPECTED.items():
        for i, t in enumerate(types):
            path, shape = f"model.layers.{i}.{n}", (8, 256 if n == "mlp.down_proj" else 96)
            assert fm(path, shape).name == f"gguf:{t}", (path, t)
    assert fm("model.layers.0.mlp.down_proj", (96, 256)) is fm("model.layers.0.mlp.down_proj", (96, 256))
    pure = gexp.linear_formats(config, "gguf:q4_k")  # --pure: one type, fallback where rows cannot hold it
    assert pure("model.layers.1.mlp.down_proj", (96, 256)).name == "gguf:q4_k"
    assert pure("model.layers.1.self_attn.v_proj", (48, 96)).name == "gguf:q5_0"
    assert pure.info["preset"].name == "Q4_K_S" and fm.info["preset"].name == "Q4_K_M"
    with pytest.raises(LowbitError, match="float type"):
        gexp.linear_formats(config, "gguf:F16")
    with pytest.raises(LowbitError, match="fit no GGUF block type"):
        pure("model.layers.0.mlp.down_proj", (96, 100))


@pytest.mark.parametrize("method", ["rtn", "awq", "gptq", "awq-joint", "awq+gptq", "dh-awq"])
def test_quantize_writes_a_mixed_preset(method, mixed_model, tmp_path, calib_text):
    out = lowbit.quantize(str(mixed_model), tmp_path / "q", method=method, fmt="gguf:Q4_K_M", export_format="gguf",
                          calib_dataset=calib_text, n_calib=4, seq_len=32, progress=False,
                          **({"n_grid": 4} if "awq" in method else {}))
    ours = _tensors(out / "model.gguf")
    for n, types in EXPECTED.items():
        for i, t in enumerate(types):
            assert ours[f"blk.{i}.{GGUF_NAME[n]}.weight"].tensor_type.name.lower() == t, (method, n, i)
    ref = tmp_path / "ref.gguf"
    gexp.export_gguf(str(mixed_model), str(ref), "Q4_K_M")
    theirs = _tensors(ref)
    assert {k: t.tensor_type for k, t in ours.items()} == {k: t.tensor_type for k, t in theirs.items()}
    same = {k for k in ours if np.array_equal(np.asarray(ours[k].data), np.asarray(theirs[k].data))}
    if method == "rtn":  # RTN is llama.cpp's own encoder per tensor: the very bytes of `lowbit export gguf`
        assert same == set(ours)
    else:  # calibrated: every quantized linear carries the method's work
        linears = {f"blk.{i}.{g}.weight" for i in range(2) for g in GGUF_NAME.values()}
        assert not linears & same, (method, sorted(linears & same))
    meta = json.loads((out / "lowbit.json").read_text())
    if method == "gptq":  # error feedback on each linear's own grid beats rounding to nearest on it
        for layer in meta["layer_stats"].values():
            for n, loss in layer["loss"].items():
                assert loss < layer["rtn_loss"][n], n


def test_plan_records_each_tensors_format(tmp_path):
    q5, q4k = GGUF_FORMATS["gguf:q5_0"](), GGUF_FORMATS["gguf:q4_k"]()
    torch.manual_seed(0)
    qts = {"a": q5.encode(torch.randn(4, 64)), "b": q4k.encode(torch.randn(4, 256))}
    save_layer(tmp_path / "00000.safetensors", qts, {}, {})
    fm = FormatMap(q4k, lambda path, shape: q5 if path == "a" else q4k)
    plan = Plan(tmp_path, fm)
    assert plan.format_name("a") == "gguf:q5_0" and plan.format_name("b") == "gguf:q4_k"
    assert plan.quantized("a").format is q5 and torch.equal(plan.quantized("b").dequantize(), qts["b"].dequantize())
    with pytest.raises(LowbitError, match="planned on gguf:q5_0"):
        Plan(tmp_path, q4k).quantized("a")


def test_search_grids_and_per_linear():
    q4k, q6k, q5 = (GGUF_FORMATS[f"gguf:{t}"]() for t in ("q4_k", "q6_k", "q5_0"))
    for f in (q4k, q6k):
        g = f.search_grid()
        assert isinstance(g, IntFormat) and (g.bits, g.group_size, g.sym) == (f.bits, f.group_size, f.sym)
    assert q5.search_grid() is q5
    assert per_linear(q5, ["a", "b"]) == {"a": q5, "b": q5}
    with pytest.raises(LowbitError, match="no format given"):
        per_linear({"a": q5}, ["a", "b"])


def _layer(model_dir) -> LayerData:
    """Layer 0 of a saved model with two calibration batches of random tokens."""
    model = StreamedModel(model_dir)
    ids = torch.randint(3, 300, (2, 32), generator=torch.Generator().manual_seed(1))
    batches = [model.embed(ids[i:i + 1]) for i in range(2)]
    model.materialize(model.layer_path(0))
    return LayerData(0, model.layers[0], model.family, batches, model.linear_names(0),
                     run=lambda b: model.run_layer(0, b))


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_calibration_importance_reaches_the_encoders(method, mixed_model, monkeypatch):
    layer = _layer(mixed_model)
    q4k, q5 = GGUF_FORMATS["gguf:q4_k"](), GGUF_FORMATS["gguf:q5_0"]()
    fmts = {n: q4k if n == "mlp.down_proj" else q5 for n in layer.weights}
    seen: dict[str, list] = {}
    for cls_name in ("encode", "fit"):
        real = getattr(GGUFFormat, cls_name)

        def spy(self, W, clip=None, importance=None, _real=real, _name=cls_name):
            seen.setdefault(self.name, []).append(importance)
            return _real(self, W, clip, importance)
        monkeypatch.setattr(GGUFFormat, cls_name, spy)
    with torch.no_grad():
        on = make_method(method, {"n_grid": 2} if method == "awq" else {}).quantize_layer(layer, fmts)
    assert {n: qt.format for n, qt in on.quantized.items()} == fmts
    imps = [i for i in seen["gguf:q4_k"] if i is not None]
    assert imps and all(i.shape == (256,) and (i > 0).all() for i in imps)
    seen.clear()
    with torch.no_grad():
        off = make_method(method, {"importance": False, **({"n_grid": 2} if method == "awq" else {})}
                          ).quantize_layer(layer, fmts)
    assert all(i is None for v in seen.values() for i in v)
    down_on, down_off = on.quantized["mlp.down_proj"], off.quantized["mlp.down_proj"]
    assert not torch.equal(down_on.dequantize(), down_off.dequantize())


def test_gptq_without_feedback_is_llama_cpp_encoding():
    """GPTQ with a diagonal H feeds no error forward: on a K-quant grid it is llama.cpp's own encoder,
    with the imatrix diag(H) / 2 when importance is on (super-blocks are fitted one at a time)."""
    from lowbit.algorithms.gptq import gptq_quantize
    torch.manual_seed(0)
    W = torch.randn(8, 512)
    d = torch.rand(512) + 0.5
    for t in ("q4_k", "q6_k"):
        fmt = GGUF_FORMATS[f"gguf:{t}"]()
        plain = gptq_quantize(W, 2 * torch.eye(512), fmt, importance=False).quantized
        assert torch.equal(plain.dequantize(), fmt.encode(W).dequantize()), t
        weighted = gptq_quantize(W, torch.diag(d), fmt, importance=True).quantized
        assert torch.equal(weighted.dequantize(), fmt.encode(W, importance=d / 2).dequantize()), t
        assert not torch.equal(weighted.dequantize(), plain.dequantize()), t


def test_export_reports_q4x_fidelity_against_the_int4_source(tmp_path, tiny_tokenizer_dir, caplog):
    """Seed 003's table: INT4 sym g32 codes written as Q4_0 directly (Q4_X) reproduce the INT4 weights
    exactly (fp16 scales); plain Q4_0 re-quantization of the same weights does not."""
    src = build_tiny_model("qwen2", tmp_path / "m", tiny_tokenizer_dir, dtype=torch.float16, **SHAPES)
    ckpt = lowbit.quantize(str(src), tmp_path / "int4", method="rtn", bits=4, group_size=32, sym=True,
                           progress=False)
    with caplog.at_level("INFO", logger="lowbit.export.gguf"):
        report = gexp.export_gguf(str(ckpt), str(tmp_path / "q4x.gguf"), "Q4_0")
    assert set(report.fidelity) == {f"blk.{i}.{g}.weight" for i in range(2) for g in GGUF_NAME.values()}
    worst = report.fidelity_summary()
    assert worst["q4_x"].max_abs_err == 0 and worst["q4_x"].cosine == pytest.approx(1, abs=1e-12)
    assert worst["q4_0"].rel_max_abs_err > 1e-3 and worst["q4_0"].cosine < worst["q4_x"].cosine
    assert "Q4_X vs the INT4 source" in caplog.text


def test_group_weight_mean_is_the_mean_over_every_linears_rows():
    from lowbit.algorithms.awq import group_weight_mean, weight_mean
    torch.manual_seed(0)
    A, B = torch.randn(6, 64), torch.randn(10, 64)
    f32, f16 = IntFormat(4, 32), IntFormat(4, 16)
    assert torch.equal(group_weight_mean([A, B], [f32, f32]), weight_mean(torch.cat([A, B]), f32))
    mixed = group_weight_mean([A, B], [f32, f16])
    assert torch.allclose(mixed, (6 * weight_mean(A, f32) + 10 * weight_mean(B, f16)) / 16)
