"""AWQ, DH-AWQ and awq-joint: invariants of the pure math, and every family end to end."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import lowbit
from lowbit.algorithms import make_method
from lowbit.errors import LowbitError
from lowbit.algorithms.awq import (AWQ, InputStats, ScaledLayer, awq_scales, clip_search, diagonal_blocks, fold,
                                   row_gain, search_dtype, single_linear, unfoldable)
import lowbit.algorithms.awq as awq_module
from lowbit.algorithms.awq_joint import cd_round, damped
from lowbit.algorithms.dh_awq import dh_round, flip_budget, greedy_flips, knee_threshold
from lowbit.algorithms.signround import GridTuner
from hypothesis import given, settings
from hypothesis import strategies as st
from lowbit.formats.base import Format
from lowbit.formats import QuantizedTensor
from lowbit.formats.int import IntFormat
from lowbit.model.layer import LayerData
from lowbit.model.stream import Batch, StreamedModel
from conftest import ALL_FAMILIES, build_tiny_model

METHODS = ["awq", "dh-awq", "awq-joint"]
FMT = IntFormat(bits=4, group_size=32)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: torch's thread hand-offs cost more than the work, badly so on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- helpers: float activations of a tiny model, layer by layer ---------------------------------------
def _streamed(model_dir, n_batches=2, seq=16, dtype=torch.float32):
    """The model with all layers materialized, and calibration batches for each layer's input."""
    model = StreamedModel(model_dir, dtype=dtype)
    ids = torch.randint(3, 300, (n_batches, seq), generator=torch.Generator().manual_seed(1))
    batches = [model.embed(ids[i:i + 1]) for i in range(n_batches)]
    per_layer = []
    with torch.no_grad():
        for i in range(model.num_layers):
            model.materialize(model.layer_path(i))
            per_layer.append([Batch(b.hidden, b.layer_kwargs) for b in batches])
            batches = [Batch(model.run_layer(i, b), b.layer_kwargs) for b in batches]
    return model, per_layer


def _layer(model, per_layer, i=0) -> LayerData:
    return LayerData(i, model.layers[i], model.family, per_layer[i], model.linear_names(i),
                     run=lambda b, i=i: model.run_layer(i, b))


def _outputs(module, batches, i, weights=None, updates=None) -> torch.Tensor:
    """Layer outputs on `batches`, with some weights / parameters replaced (on a copy)."""
    m = copy.deepcopy(module)
    for n, W in (weights or {}).items():
        m.get_submodule(n).weight.data = W.to(m.get_submodule(n).weight.dtype)
    for n, t in (updates or {}).items():
        m.get_parameter(n).data = t.to(m.get_parameter(n).dtype)
    with torch.no_grad():
        outs = [m(b.hidden, **b.layer_kwargs[i]) for b in batches]
    return torch.cat([(o[0] if isinstance(o, tuple) else o).float() for o in outs])


@pytest.fixture(scope="module")
def mha_models(tmp_path_factory, tiny_tokenizer_dir):
    """Models without grouped-query attention, so v_proj -> o_proj scales fold too (qwen2: v has a bias)."""
    from transformers import AutoModelForCausalLM
    root = tmp_path_factory.mktemp("mha")
    dirs = {f: build_tiny_model(f, root / f, tiny_tokenizer_dir, num_key_value_heads=4) for f in ("llama", "qwen2")}
    model = AutoModelForCausalLM.from_pretrained(dirs["qwen2"])
    with torch.no_grad():  # non-zero biases, so a bias left unfolded shows
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    # saved to a new directory: the loaded tensors may still map the old file
    biased = build_tiny_model("qwen2", root / "qwen2-biased", tiny_tokenizer_dir, num_key_value_heads=4)
    model.save_pretrained(biased)
    dirs["qwen2"] = biased
    return dirs


def _model_dir(family, tiny_models, mha_models):
    return mha_models[family[:-4]] if family.endswith("-mha") else tiny_models[family]


# -- scale folding ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ALL_FAMILIES + ["llama-mha", "qwen2-mha"])
def test_folding_keeps_the_float_layer_output(family, tiny_models, mha_models):
    model, per_layer = _streamed(_model_dir(family, tiny_models, mha_models))
    layer = _layer(model, per_layer)
    ref = _outputs(layer.module, per_layer[0], 0)

    state = ScaledLayer.of(layer)
    g = torch.Generator().manual_seed(0)
    folded = []
    for group in model.family.balance:
        if unfoldable(layer, state, group) is None:
            width = state.weights[group.linears[0]].shape[1]
            fold(layer, state, group, torch.exp(torch.empty(width).uniform_(-1.5, 1.5, generator=g)))
            folded.append(group.prev)
    assert len(folded) >= len(model.family.balance) - 1  # only v -> o may not fold (GQA)
    if family.endswith("-mha"):
        assert "self_attn.v_proj" in folded and any(k.endswith("v_proj.bias") for k in state.updates) == (
            family == "qwen2-mha")
    out = _outputs(layer.module, per_layer[0], 0, state.weights, state.updates)
    assert not torch.equal(state.weights[model.family.balance[0].linears[0]],
                           layer.weights[model.family.balance[0].linears[0]])
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)

    # the scales AWQ itself searches (quantization left out of the output): the float output holds too
    plan = AWQ(n_grid=5).plan(layer, FMT)
    assert plan.info, "no balance group was searched"
    torch.testing.assert_close(_outputs(layer.module, per_layer[0], 0, plan.state.weights, plan.state.updates),
                               ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["awq", "awq-joint"])
def test_folding_in_place_plans_like_copying(method, mha_models, monkeypatch):
    """bf16 layers: AWQ folds into the layer's private float32 copies (one copy of the weights, not
    two) and still plans exactly what folding into fresh tensors does, v -> o and up -> down included
    (their objectives read the original o / down weights after earlier folds)."""
    model, per_layer = _streamed(mha_models["llama"], dtype=torch.bfloat16)
    layer = _layer(model, per_layer)
    before = {n: W.clone() for n, W in layer.weights.items()}
    a = make_method(method, {"n_grid": 5}).quantize_layer(layer, FMT)
    changed = [n for n in before if not torch.equal(layer.weights[n], before[n])]
    assert changed, "nothing was folded in place"

    of = ScaledLayer.of.__func__
    monkeypatch.setattr(ScaledLayer, "of", classmethod(lambda cls, layer, consume=False: of(cls, layer, False)))
    layer = _layer(model, per_layer)
    b = make_method(method, {"n_grid": 5}).quantize_layer(layer, FMT)
    assert all(torch.equal(layer.weights[n], before[n]) for n in before)
    assert a.stats["groups"] == b.stats["groups"] and len(a.stats["groups"]) == 4
    for n in a.quantized:
        assert torch.equal(a.quantized[n].dequantize(), b.quantized[n].dequantize()), n
    assert a.updates.keys() == b.updates.keys()
    for k in a.updates:
        assert torch.equal(a.updates[k], b.updates[k]), k


@pytest.mark.parametrize("method", ["awq", "awq+gptq"])
def test_a_disposable_layer_frees_its_weights_once_planned(method, tiny_models):
    """The pipeline's layers are disposable: after the searches the module's weights are dropped
    (AWQ works from its folded copies then), and the codes are exactly those of a kept layer."""
    model, per_layer = _streamed(tiny_models["llama"])
    kept = make_method(method, {"n_grid": 5}).quantize_layer(_layer(model, per_layer), FMT)
    module = model.layers[0]
    layer = LayerData(0, module, model.family, per_layer[0], model.linear_names(0),
                      run=lambda b: model.run_layer(0, b), disposable=True)
    freed = make_method(method, {"n_grid": 5}).quantize_layer(layer, FMT)
    for n in model.linear_names(0):
        assert module.get_submodule(n).weight.numel() == 0, n
        assert layer.weights[n].is_meta and layer.weights[n].shape == kept.quantized[n].W_q.shape
        assert torch.equal(freed.quantized[n].W_q, kept.quantized[n].W_q), n
        assert torch.equal(freed.quantized[n].qparams.scale, kept.quantized[n].qparams.scale), n


def test_sampled_inputs_give_the_moments_of_h():
    """Second moments kept as the tokens' inputs X (fewer tokens than channels) answer as H does."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(300, 96, generator=g).bfloat16()
    H = X.float().T @ X.float() / 300
    zero = torch.zeros(96)
    dense, sampled = InputStats(zero, zero, zero, H), InputStats(zero, zero, zero, X=X)
    c, dW = torch.rand(96, generator=g) + 0.5, torch.randn(40, 96, generator=g)
    twice = (dense.scaled(c).scaled(c), sampled.scaled(c).scaled(c))
    for a, b in [(dense, sampled), (dense.scaled(c), sampled.scaled(c)), twice]:
        assert b.output_error(dW) == pytest.approx(a.output_error(dW), rel=1e-5)
        torch.testing.assert_close(b.H, a.H)
        torch.testing.assert_close(b.blocks(32), a.blocks(32))
    assert dense.scaled(c).output_error(dW) == pytest.approx(float(((dW @ dense.scaled(c).H) * dW).sum() / 40), rel=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_sampled_inputs_plan_like_the_full_hessian(family, tiny_models, monkeypatch):
    """32 calibration tokens, 64 and 128 input channels: AWQ keeps every input's tokens instead of H
    (an 8B down_proj's H is 822 MB) and searches and clips exactly as it would from H."""
    model, per_layer = _streamed(tiny_models[family])
    kept = []
    monkeypatch.setattr(InputStats, "__init__", _recording(InputStats.__init__, kept))
    a = make_method("awq", {"n_grid": 5}).quantize_layer(_layer(model, per_layer), FMT)
    assert kept and all(X is not None for X in kept)
    kept.clear()
    monkeypatch.setattr(AWQ, "full_hessian", True)
    b = make_method("awq", {"n_grid": 5}).quantize_layer(_layer(model, per_layer), FMT)
    assert kept and all(X is None for X in kept)
    assert [g["alpha"] for g in a.stats["groups"].values()] == [g["alpha"] for g in b.stats["groups"].values()]
    for ga, gb in zip(a.stats["groups"].values(), b.stats["groups"].values()):
        assert ga["loss"] == pytest.approx(gb["loss"], rel=1e-4)
    for n in a.quantized:  # the same codes; row gains from X or from H agree to float rounding
        assert torch.equal(a.quantized[n].W_q, b.quantized[n].W_q), n
        torch.testing.assert_close(a.quantized[n].dequantize(), b.quantized[n].dequantize(), rtol=1e-5, atol=1e-7)


def _recording(init, kept: list):
    def wrapped(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if self._c is None:  # the collected stats, not a scaled view of them
            kept.append(self._X)
    return wrapped


def test_gemma_norm_folds_as_one_plus_w(tiny_models):
    model, per_layer = _streamed(tiny_models["gemma2"])
    layer = _layer(model, per_layer)
    state = ScaledLayer.of(layer)
    group = model.family.balance[0]
    s = torch.full((64,), 2.0)
    fold(layer, state, group, s)
    w = layer.param(group.prev + ".weight")
    torch.testing.assert_close(1 + state.updates[group.prev + ".weight"], (1 + w) / 2)


# -- AWQ invariants ----------------------------------------------------------------------------------------
def test_awq_scales_alpha_zero_are_ones_and_normalised():
    x = torch.rand(64) * 10
    assert torch.equal(awq_scales(x, 0.0), torch.ones(64))
    s = awq_scales(x, 0.7)
    assert math.isclose(float(s.max() * s.min()), 1.0, rel_tol=1e-5)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_awq_with_alpha_zero_and_no_clipping_is_rtn(family, tiny_models):
    model, per_layer = _streamed(tiny_models[family])
    layer = _layer(model, per_layer)
    awq = make_method("awq", {"n_grid": 1, "clip": False, "row_gain": False}).quantize_layer(layer, FMT)
    rtn = make_method("rtn").quantize_layer(layer, FMT)
    assert awq.updates == {}
    assert awq.quantized.keys() == rtn.quantized.keys()
    for n, qt in rtn.quantized.items():
        assert torch.equal(awq.quantized[n].W_q, qt.W_q), n
        assert torch.equal(awq.quantized[n].qparams.scale, qt.qparams.scale), n
        assert torch.equal(awq.quantized[n].qparams.zero, qt.qparams.zero), n


def test_clip_search_picks_the_best_ratio_per_group():
    torch.manual_seed(0)
    W = torch.randn(8, 64)
    W[:, 3] = 6.0  # an outlier stretches its group's range: shrinking it pays off there
    X = torch.randn(500, 64)
    H = X.T @ X / 500
    ratios = [1.0, 0.9, 0.8, 0.7, 0.6]
    blocks = diagonal_blocks(H, 32)
    clip, err = clip_search(W, blocks, FMT, ratios)
    for o in range(8):
        for g in range(2):
            errs = []
            for r in ratios:
                Wr = FMT.fake_quantize(W, r)
                d = (Wr - W)[o, g * 32:(g + 1) * 32]
                errs.append(float(d @ blocks[g] @ d))
            assert clip[o, g] == ratios[min(range(len(errs)), key=errs.__getitem__)]
            assert math.isclose(float(err[o, g]), min(errs), rel_tol=1e-4)


def _row_errors(W, W_r, H):
    return (((W_r - W) @ H) * (W_r - W)).sum(1)


@pytest.mark.parametrize("fmt", [FMT, IntFormat(4, 32, sym=True, scale_dtype=torch.float16)])
def test_row_gain_is_the_least_squares_factor_and_never_raises_a_rows_error(fmt):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(24, 64, generator=g)
    X = (torch.randn(400, 64, generator=g) @ torch.randn(64, 64, generator=g) + 0.3).bfloat16()
    H = X.float().T @ X.float() / 400
    zero = torch.zeros(64)
    qt = fmt.encode(W, 0.7)  # heavy clipping: every row's reconstruction comes out small
    W_r = qt.dequantize()
    gain = row_gain(W, W_r, InputStats(zero, zero, zero, H))
    torch.testing.assert_close(row_gain(W, W_r, InputStats(zero, zero, zero, X=X)), gain, rtol=1e-4, atol=1e-5)
    assert bool((gain > 1).all())
    base = _row_errors(W, W_r, H)
    for eps in (0.0, 0.01, -0.01):  # the minimum along g: no nearby factor does better
        assert bool((_row_errors(W, W_r * (gain + eps)[:, None], H) >= _row_errors(W, W_r * gain[:, None], H) - 1e-4).all())
    rescaled = fmt.rescale_rows(qt, gain)
    assert torch.equal(rescaled.W_q, qt.W_q) and torch.equal(rescaled.qparams.zero, qt.qparams.zero)
    torch.testing.assert_close(rescaled.dequantize(), W_r * gain[:, None], rtol=2e-3, atol=1e-6)
    assert bool((_row_errors(W, rescaled.dequantize(), H) <= base + 1e-4).all())
    assert torch.equal(row_gain(W, torch.zeros_like(W), InputStats(zero, zero, zero, H)), torch.ones(24))


def test_row_gain_goes_into_per_row_scales_and_is_refused_elsewhere():
    from lowbit.formats import make_format
    from lowbit.spec import QuantScheme
    W = torch.randn(8, 64)
    gain = torch.linspace(0.9, 1.1, 8)
    for name in ("mxfp4", "nvfp4"):  # power-of-two scales; a global scale
        f = make_format(QuantScheme(bits=4, group_size=32, sym=True, format=name)).for_tensor(W)
        assert f.rescale_rows(f.encode(W), gain) is None, name
    for name in ("nf4", "fp8_e4m3"):
        f = make_format(QuantScheme(bits=8 if "fp8" in name else 4, group_size=32, sym=True, format=name))
        qt = f.encode(W)
        torch.testing.assert_close(f.rescale_rows(qt, gain).dequantize(), qt.dequantize() * gain[:, None])
    from lowbit.formats.fp8 import FP8E4M3Format
    per_tensor = FP8E4M3Format(per_tensor=True).for_tensor(W)
    assert per_tensor.rescale_rows(per_tensor.encode(W), gain) is None


def test_awq_row_gain_changes_only_the_scales(tiny_models):
    model, per_layer = _streamed(tiny_models["llama"])
    layer = _layer(model, per_layer)
    off = make_method("awq", {"n_grid": 4, "row_gain": False}).quantize_layer(layer, FMT)
    on = make_method("awq", {"n_grid": 4}).quantize_layer(layer, FMT)
    assert off.stats["groups"] == on.stats["groups"]
    for n, qt in off.quantized.items():
        assert torch.equal(on.quantized[n].W_q, qt.W_q), n
        ratio = on.quantized[n].qparams.scale / qt.qparams.scale
        torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-5, atol=0)  # one factor per row
    assert any("gain_dev" in r for r in on.stats["rounding"].values())


# -- DH rounding -----------------------------------------------------------------------------------------
def _greedy_reference(b, impact, allowed, budget, penalty=None):
    """The greedy rule one row and one flip at a time, in plain Python."""
    penalty = torch.zeros_like(impact) if penalty is None else penalty
    out, n = impact.shape
    flipped = torch.zeros(out, n, dtype=torch.bool)
    b_after = b.clone()
    for r in range(out):
        cur = b[r].clone()
        used = set()
        for _ in range(budget):
            best_j, best_v = None, None
            for j in range(n):
                if not allowed[r, j] or j in used:
                    continue
                v = (cur + impact[r, j]) ** 2 + penalty[r, j]
                if best_v is None or v < best_v:
                    best_j, best_v = j, v
            if best_j is None or not best_v < cur ** 2:
                break
            cur = cur + impact[r, best_j]
            used.add(best_j)
            flipped[r, best_j] = True
        b_after[r] = cur
    return flipped, b_after


@pytest.mark.parametrize("seed", range(4))
def test_greedy_flips_equal_the_slow_reference(seed):
    g = torch.Generator().manual_seed(seed)
    out, n = 6, 40
    impact = torch.randn(out, n, generator=g)
    if seed == 3:  # integer impacts: many ties, broken the same way (lowest column)
        impact = torch.randint(-3, 4, (out, n), generator=g).float()
    b = torch.randn(out, generator=g) * 4
    allowed = torch.rand(out, n, generator=g) > 0.3
    penalty = torch.rand(out, n, generator=g) * 2 if seed % 2 else None  # flip_cost "mse"
    for budget in (1, 3, 50):
        fast = greedy_flips(b, impact, allowed, budget, penalty)
        slow = _greedy_reference(b, impact, allowed, budget, penalty)
        assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])


def _seed_code_flips(W, W_q, fmt, qp, mu, outliers, max_flips):
    """Seed 001's awq_dh_xl.py flip step, restated loop by loop for evenly spaced int grids: the flips
    that move the error towards 0, sorted by rounding cost |W/s + z − q| descending, the prefix that
    leaves |error| least, then the first max_flips of it."""
    scale, zero = fmt.per_weight(qp, W.shape[1])
    W_q = W_q.clone().long()
    for r in range(W.shape[0]):
        frac = W[r] / scale[r] + zero[r] - W_q[r]
        err = float(((W[r] - (W_q[r] - zero[r]) * scale[r]) * mu).sum())
        direction = torch.where(frac >= 0, 1, -1)
        impact = mu * direction * scale[r]
        ok = [j for j in range(W.shape[1]) if not outliers[j] and 0 <= W_q[r, j] + direction[j] <= fmt.qmax
              and float(impact[j]) != 0 and (float(impact[j]) > 0) == (err > 0)]
        ok.sort(key=lambda j: -abs(float(frac[j])))
        best_k, best, cum = 0, abs(err), 0.0
        for k, j in enumerate(ok, 1):
            cum += float(impact[j])
            if abs(err - cum) < best:
                best_k, best = k, abs(err - cum)
        for j in ok[:min(best_k, max_flips)]:
            W_q[r, j] += direction[j]
    return W_q


@pytest.mark.parametrize("sym", [False, True])
def test_dh_cost_order_is_seed_001s_code(sym):
    torch.manual_seed(3)
    fmt = IntFormat(bits=4, group_size=32, sym=sym)
    W = torch.randn(24, 96, dtype=torch.float64) * 0.05
    mu = torch.randn(96, dtype=torch.float64) * 0.3
    outliers = torch.zeros(96, dtype=torch.bool)
    outliers[[4, 50]] = True
    qp = fmt.fit(W, 0.9)
    W_q0 = fmt.quantize(W, qp)
    for budget in (1, 3, 96):
        ours, info = dh_round(W, W_q0, qp, fmt, mu, outliers, budget)
        assert torch.equal(ours.long(), _seed_code_flips(W, W_q0, fmt, qp, mu, outliers, budget))
        assert info["b_after"] < info["b_before"]


@pytest.mark.parametrize("order", ["cost", "gain"])
def test_dh_flips_with_mse_cost_never_raise_the_rows_output_error(order):
    """flip_cost "mse": with inputs of mean μ and independent spreads var, each row's output error
    b² + Σ_j e_j² var_j (e = W_r − W) only falls, and fewer flips are taken than under the |b| rule."""
    torch.manual_seed(1)
    fmt = IntFormat(bits=4, group_size=32, sym=False)
    W = torch.randn(64, 128) * 0.05
    mu, var = torch.randn(128) * 0.3, torch.rand(128) * 2
    qp = fmt.fit(W, 1.0)
    W_q0 = fmt.quantize(W, qp)
    none = torch.zeros(128, dtype=torch.bool)

    def row_error(W_q):
        E = fmt.dequantize(W_q, qp) - W
        return (E @ mu) ** 2 + E.square() @ var

    W_q, info = dh_round(W, W_q0, qp, fmt, mu, none, 16, var, order=order)
    plain, plain_info = dh_round(W, W_q0, qp, fmt, mu, none, 16, order=order)
    assert (row_error(W_q) <= row_error(W_q0) + 1e-9).all() and row_error(W_q).sum() < row_error(W_q0).sum()
    assert 0 < info["flips"] < plain_info["flips"]
    assert row_error(plain).sum() > row_error(W_q).sum()


@pytest.mark.parametrize("sym", [False, True])
def test_dh_flips_shrink_b_within_budget_and_spare_outliers(sym):
    torch.manual_seed(0)
    fmt = IntFormat(bits=4, group_size=32, sym=sym)
    W = torch.randn(48, 128) * 0.05
    mu = torch.randn(128) * 0.2
    mu[[5, 70]] = 8.0
    outliers = mu.abs() > knee_threshold(mu.abs())
    assert outliers[5] and outliers[70] and outliers.sum() < 20
    qp = fmt.fit(W, 0.9)
    W_q0 = fmt.quantize(W, qp)
    budget = flip_budget(128, 0.05)
    W_q, info = dh_round(W, W_q0, qp, fmt, mu, outliers, budget)
    b0 = (fmt.dequantize(W_q0, qp) - W) @ mu
    b1 = (fmt.dequantize(W_q, qp) - W) @ mu
    assert (b1.abs() <= b0.abs() + 1e-7).all() and b1.abs().sum() < b0.abs().sum()
    changed = W_q != W_q0
    assert (changed.sum(1) <= budget).all() and info["flips"] == int(changed.sum())
    assert not changed[:, outliers].any()
    # every flip went to the other neighbouring grid point, on the far side of W
    codes, _, valid = fmt.neighbour_codes(W, W_q0, qp)
    assert torch.equal(W_q[changed], codes[changed]) and valid[changed].all()
    assert ((W_q.int() - W_q0.int()).abs() <= 1).all()


@pytest.mark.parametrize("bits,sym,clip", [(4, False, 0.9), (4, True, 1.0), (3, False, 0.7), (8, True, 0.8)])
def test_int_neighbour_codes_equal_the_trial_decoding_definition(bits, sym, clip):
    """IntFormat's one-scale-away shortcut gives what the generic search over W_q ± 1 finds."""
    torch.manual_seed(bits)
    fmt = IntFormat(bits=bits, group_size=32, sym=sym)
    W = torch.randn(40, 96) * 0.05
    W[3, :32] = 0.0  # a flat group: every weight on the grid, the neighbour is up
    qp = fmt.fit(W, clip)
    W_q = fmt.quantize(W, qp)
    fast = fmt.neighbour_codes(W, W_q, qp)
    slow = Format.neighbour_codes(fmt, W, W_q, qp)
    assert torch.equal(fast[0], slow[0]) and torch.equal(fast[2], slow[2])
    assert torch.allclose(fast[1], slow[1], rtol=1e-5, atol=1e-7)
    assert 0.5 < fast[2].float().mean() < 1.0  # clipped weights at the range ends have none


def test_knee_threshold_marks_the_tail_and_handles_flat_curves():
    m = torch.cat([torch.rand(500), torch.tensor([20.0, 30.0, 40.0])])
    t = knee_threshold(m)
    assert (m > t).sum() <= 10 and (m > t)[-3:].all()
    assert knee_threshold(torch.ones(100)) == math.inf
    assert knee_threshold(m, tolerance=-1.0) == float(m.max())  # the knee moved to the top: no outliers
    assert (m > knee_threshold(m, tolerance=0.2)).sum() > 50  # 0.2 of the half further down



@pytest.mark.parametrize("knee_on", ["mean", "rms"])
def test_dh_knee_on_picks_the_channels_it_names(knee_on):
    """knee_on=mean masks channels with a large |E[x]|, rms those with a large √E[x²] (zero mean included)."""
    torch.manual_seed(0)
    n = 256
    mean, sq = torch.rand(n) * 0.1, torch.rand(n) * 0.02 + 0.01
    mean[7] = 5.0
    sq[7] = 25.5  # loud in both
    sq[40] = 30.0  # a zero-mean channel that is loud
    mean[40] = 0.0
    X = InputStats(mean, sq, sq.sqrt(), torch.eye(n))
    W = torch.randn(16, n) * 0.05
    fmt = IntFormat(bits=4, group_size=32)
    qt = QuantizedTensor(fmt.quantize(W, fmt.fit(W)), fmt.fit(W), fmt)
    method = make_method("dh-awq", {"knee_on": knee_on, "max_flip_percent": 0.1})
    stats: dict = {}
    method.round(W, qt, X, "x", stats)
    loud = sq.sqrt() if knee_on == "rms" else mean.abs()
    assert stats["knee"] is not None and loud[7] > stats["knee"]
    assert (loud[40] > stats["knee"]) == (knee_on == "rms")
    with pytest.raises(LowbitError, match="--knee-on"):
        make_method("dh-awq", {"knee_on": "max"})

# -- coordinate-descent rounding --------------------------------------------------------------------------
def test_cd_rounding_with_identity_hessian_is_rtn_and_never_raises_the_loss():
    torch.manual_seed(0)
    W = torch.randn(16, 64)
    qp = FMT.fit(W, 0.9)
    W_q = FMT.quantize(W, qp)
    assert torch.equal(cd_round(W, W_q, qp, FMT, torch.eye(64), sweeps=2)[0], W_q)
    X = torch.randn(200, 64) @ torch.randn(64, 64) + 0.5  # correlated inputs with a mean
    H = damped(X.T @ X / 200, 0.01)
    loss = lambda codes: float((((FMT.dequantize(codes, qp) - W) @ H) * (FMT.dequantize(codes, qp) - W)).sum())
    one, moved = cd_round(W, W_q, qp, FMT, H, sweeps=1)
    two, _ = cd_round(W, W_q, qp, FMT, H, sweeps=3)
    assert moved > 0 and loss(two) <= loss(one) < loss(W_q)


# -- signed-gradient refinement (awq-joint) ------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 5), groups=st.integers(1, 3), group_size=st.sampled_from([8, 32]),
       bits=st.sampled_from([2, 3, 4, 8]), sym=st.booleans(), clip=st.sampled_from([0.6, 0.9, 1.0]),
       seed=st.integers(0, 2 ** 16))
def test_tuner_starts_on_the_codes_and_grid_it_is_given(rows, groups, group_size, bits, sym, clip, seed):
    """Clipped weights, and codes flipped to the other neighbour (as cd / DH rounding leave them),
    included: the tuner's start is the given QuantizedTensor, in codes, zeros, scales and weights."""
    g = torch.Generator().manual_seed(seed)
    fmt = IntFormat(bits=bits, group_size=group_size, sym=sym)
    W = torch.randn(rows, groups * group_size, generator=g) * torch.rand(rows, 1, generator=g).add(0.1)
    qt = fmt.encode(W, clip)
    other, _, valid = fmt.neighbour_codes(W, qt.W_q, qt.qparams)
    flip = valid & (torch.rand(W.shape, generator=g) < 0.3)
    qt = QuantizedTensor(torch.where(flip, other, qt.W_q), qt.qparams, fmt)
    tuner = GridTuner(W, qt)
    start = tuner.quantized()
    assert torch.equal(start.W_q, qt.W_q) and torch.equal(start.qparams.zero, qt.qparams.zero)
    torch.testing.assert_close(start.qparams.scale, qt.qparams.scale, rtol=1e-6, atol=0)
    torch.testing.assert_close(tuner.weight().detach(), qt.dequantize(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sym", [False, True])
def test_tuner_gradients_are_the_straight_through_chain_rule(sym):
    """The one-pass backward of the tuned weight equals autograd through the same chain written
    out (rounding straight through where it is not held by a bound), V, a and b alike."""
    torch.manual_seed(0)
    fmt = IntFormat(bits=3, group_size=16, sym=sym)
    W = torch.randn(6, 48)
    tuner = GridTuner(W, fmt.encode(W, 0.8))
    with torch.no_grad():  # off the start, so bounds, clipped weights and zero shifts all occur
        tuner.V.uniform_(-1, 1)
        tuner.a.uniform_(0.7, 1.3)
        tuner.b.uniform_(0.7, 1.3)
    G = torch.randn(6, 48)
    fast = torch.autograd.grad((tuner.weight() * G).sum(), tuner.parameters())

    scale, zero = tuner.grid()
    q = fmt.grouped(W) / scale[..., None] + zero[..., None]
    r = q + tuner.V
    r = r + (r.round() - r).detach()
    low = q.detach().floor()
    bounded = torch.minimum(torch.maximum(r.detach(), low), low + 1).clamp(0, fmt.qmax)
    c = torch.where(bounded == r.detach(), r, bounded)
    slow = torch.autograd.grad((((c - zero[..., None]) * scale[..., None]).reshape(6, 48) * G).sum(),
                               tuner.parameters())
    for f, s_ in zip(fast, slow):
        torch.testing.assert_close(f, s_, rtol=1e-4, atol=1e-5)
    assert all(float(g.abs().sum()) > 0 for g in fast)


def _refined(layer, **options):
    return make_method("awq-joint", {"n_grid": 5, "search_dtype": "model", **options}).quantize_layer(layer, FMT)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_refine_lowers_the_layer_output_error_it_reports(family, tiny_models):
    """The MSEs refine reports are the layer's real output errors (its forward with replaced
    parameters is the layer's own), and what it keeps lowers them: on every family."""
    model, per_layer = _streamed(tiny_models[family], n_batches=2, seq=32)
    layer = _layer(model, per_layer)
    plain = _layer_mse(layer, per_layer, 0, _refined(layer, refine_steps=0))
    layer = _layer(model, per_layer)
    tuned = _refined(layer, refine_steps=60)
    info = tuned.stats["refine"]
    assert info["mse_before"] == pytest.approx(plain, rel=1e-3)
    assert info["kept"] and info["mse_after"] < info["mse_before"] and info["codes_changed_pct"] > 0
    assert _layer_mse(layer, per_layer, 0, tuned) == pytest.approx(info["mse_after"], rel=1e-3)


def test_refine_aims_at_the_float_models_stream(tiny_llama, calib_text, tmp_path):
    """--refine-target float: layer 0's target is what `layer` gives (both streams start at the
    embeddings); from layer 1 on it is the float model's own activations, which the quantized
    stream no longer equals."""
    stats = {}
    for target in ("float", "layer"):
        out = lowbit.quantize(tiny_llama, tmp_path / target, method="awq-joint", group_size=32, n_calib=4, seq_len=32,
                              calib_dataset=calib_text, export_format="fake", progress=False, n_grid=5,
                              refine_steps=20, refine_target=target)
        stats[target] = json.loads((out / "lowbit.json").read_text())["layer_stats"]
    first, second = (stats["float"][k]["refine"]["mse_before"] / stats["layer"][k]["refine"]["mse_before"]
                     for k in ("00000", "00001"))
    assert first == pytest.approx(1, rel=1e-6) and second > 1.01


def test_refine_keeps_the_searched_codes_when_tuning_ends_worse(tiny_models):
    model, per_layer = _streamed(tiny_models["llama"], n_batches=2, seq=32)
    plain = _refined(_layer(model, per_layer), refine_steps=0)
    wild = _refined(_layer(model, per_layer), refine_steps=3, refine_lr=3.0)  # steps far past any bin
    assert not wild.stats["refine"]["kept"] and wild.stats["refine"]["mse_after"] > wild.stats["refine"]["mse_before"]
    for n, qt in plain.quantized.items():
        assert torch.equal(qt.W_q, wild.quantized[n].W_q) and torch.equal(qt.qparams.scale, wild.quantized[n].qparams.scale)
    with pytest.raises(LowbitError, match="--refine-steps"):
        make_method("awq-joint", {"refine_steps": -1})


# -- every method, every family -----------------------------------------------------------------------------
def _layer_mse(layer, per_layer, i, result) -> float:
    ref = _outputs(layer.module, per_layer[i], i)
    W = {n: qt.dequantize() for n, qt in result.quantized.items()}
    return float(((_outputs(layer.module, per_layer[i], i, W, result.updates) - ref) ** 2).mean())


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_each_layer_reconstructs_no_worse_than_rtn(family, tiny_models):
    model, per_layer = _streamed(tiny_models[family], n_batches=2, seq=32)
    for i in range(model.num_layers):
        layer = _layer(model, per_layer, i)
        rtn = _layer_mse(layer, per_layer, i, make_method("rtn").quantize_layer(layer, FMT))
        for m in METHODS:
            mse = _layer_mse(layer, per_layer, i, make_method(m).quantize_layer(layer, FMT))
            assert mse <= rtn, f"{m} layer {i}: {mse:.3g} > RTN {rtn:.3g}"


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_end_to_end_every_family(family, method, tiny_models, calib_text, tmp_path):
    from transformers import AutoModelForCausalLM
    from safetensors.torch import load_file
    src = tiny_models[family]
    out = lowbit.quantize(src, tmp_path / "o", method=method, group_size=32, n_calib=4, seq_len=32,
                          calib_dataset=calib_text, export_format="fake", progress=False)
    meta = json.loads((out / "lowbit.json").read_text())
    assert meta["recipe"]["method"] == method and meta["layer_stats"]["00000"]["groups"]
    a, b = load_file(out / "model.safetensors"), load_file(src / "model.safetensors")
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], b[k]) for k in a if "norm" in k)  # scales were folded into norms
    m = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.isfinite(m(input_ids=torch.randint(3, 300, (1, 12))).logits).all()


@pytest.mark.parametrize("method", METHODS)
def test_lm_head_in_chunks(method, tiny_llama, calib_text, tmp_path):
    """lm_head has no balance group: it gets the clipping and rounding alone, chunk by chunk."""
    from safetensors.torch import load_file
    out = lowbit.quantize(tiny_llama, tmp_path / "o", method=method, group_size=32, n_calib=4, seq_len=32,
                          calib_dataset=calib_text, quantize_lm_head=True, lmhead_chunks=2, export_format="fake",
                          progress=False)
    a, b = load_file(out / "model.safetensors"), load_file(tiny_llama / "model.safetensors")
    assert not torch.equal(a["lm_head.weight"], b["lm_head.weight"])
    assert torch.allclose(a["lm_head.weight"], b["lm_head.weight"], atol=0.05)


def test_folded_v_bias_reaches_compressed_tensors(mha_models, calib_text, tmp_path):
    """qwen2 without GQA: v -> o folds into v_proj's weight rows and bias; both exports agree."""
    from lowbit.eval.evaluate import load_causal_lm
    from safetensors.torch import load_file
    src = mha_models["qwen2"]
    kw = dict(method="awq", group_size=32, n_calib=4, seq_len=32, calib_dataset=calib_text, progress=False)
    ct = lowbit.quantize(src, tmp_path / "ct", **kw)
    fake = lowbit.quantize(src, tmp_path / "fake", export_format="fake", **kw)
    bias = "model.layers.0.self_attn.v_proj.bias"
    assert not torch.equal(load_file(ct / "model.safetensors")[bias], load_file(src / "model.safetensors")[bias])
    ids = torch.randint(3, 300, (2, 16))
    with torch.no_grad():
        a, b = (load_causal_lm(str(p))[0](input_ids=ids).logits for p in (ct, fake))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt_name", ["nf4", "mxfp4", "nvfp4", "fp8_e4m3", "gguf:q4_0", "gguf:q8_0"])
def test_other_formats_reconstruct_no_worse_than_rtn(fmt_name, tiny_models):
    """AWQ needs only fit / quantize / dequantize of a format: codebooks, fp grids, GGUF blocks."""
    from lowbit.formats import FORMATS
    fmt = FORMATS[fmt_name](group_size=32)
    model, per_layer = _streamed(tiny_models["llama"], n_batches=2, seq=32)
    layer = _layer(model, per_layer, 0)
    rtn = _layer_mse(layer, per_layer, 0, make_method("rtn").quantize_layer(layer, fmt))
    for m in METHODS:
        result = make_method(m).quantize_layer(layer, fmt)
        assert all(qt.format.name == fmt_name for qt in result.quantized.values())
        assert _layer_mse(layer, per_layer, 0, result) <= rtn, m


# -- 16-bit search -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_a_narrowed_view_runs_blocks_in_its_dtype_and_leaves_the_layer_alone(family, tiny_models):
    model, per_layer = _streamed(tiny_models[family])
    layer = _layer(model, per_layer)
    before = {n: p.detach().clone() for n, p in layer.module.named_parameters()}
    narrow = layer.narrowed(torch.bfloat16)
    assert layer.narrowed(torch.float32) is layer
    for group in model.family.balance:
        if single_linear(group) or unfoldable(layer, ScaledLayer.of(layer), group):
            continue
        args, kwargs = narrow.block_inputs(group.block)[0]
        assert (args[0] if args else kwargs["hidden_states"]).dtype == torch.bfloat16
        assert next(narrow.module.get_submodule(group.block).parameters()).dtype == torch.bfloat16
        for a, b in zip(layer.run_block(group.block), narrow.run_block(group.block)):
            assert b.dtype == torch.float32
            assert float((a - b).norm() / a.norm()) < 0.03, group.block
    for n, p in layer.module.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, before[n]), n


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_awq_searches_in_bfloat16_on_request(family, tiny_models):
    model, per_layer = _streamed(tiny_models[family], n_batches=2, seq=32)
    layer = _layer(model, per_layer)
    full = make_method("awq", {"n_grid": 5, "search_dtype": "model"}).quantize_layer(layer, FMT)
    narrow = make_method("awq", {"n_grid": 5, "search_dtype": "bfloat16"}).quantize_layer(layer, FMT)
    assert full.stats["groups"].keys() == narrow.stats["groups"].keys()
    for g, info in narrow.stats["groups"].items():
        assert math.isfinite(info["loss"])
        assert info["loss"] == pytest.approx(full.stats["groups"][g]["loss"], rel=0.1), g
    with pytest.raises(LowbitError, match="search-dtype"):
        make_method("awq", {"search_dtype": "int8"})


def test_auto_search_dtype_narrows_float32_layers_only(tiny_models, monkeypatch):
    """The default searches a float32 layer on a bf16 copy for a coarse grid where the CPU runs bf16
    fast, and as it is for an 8-bit grid, a 16-bit layer or a CPU without bf16 instructions."""
    model, per_layer = _streamed(tiny_models["llama"], n_batches=2, seq=32)
    layer = _layer(model, per_layer)
    monkeypatch.setattr(awq_module, "fast_bf16", lambda device: False)
    assert search_dtype("auto", layer, FMT) is None
    monkeypatch.setattr(awq_module, "fast_bf16", lambda device: True)
    assert search_dtype("auto", layer, FMT) == torch.bfloat16 and search_dtype("model", layer, FMT) is None
    assert search_dtype("auto", layer, IntFormat(bits=8, group_size=32)) is None
    auto = make_method("awq", {"n_grid": 5}).quantize_layer(layer, FMT)
    bf16 = make_method("awq", {"n_grid": 5, "search_dtype": "bfloat16"}).quantize_layer(layer, FMT)
    summary = lambda r: {g: (i["alpha"], i["loss"]) for g, i in r.stats["groups"].items()}  # noqa: E731
    assert summary(auto) == summary(bf16)
    assert search_dtype("auto", layer.narrowed(torch.bfloat16), FMT) is None


@pytest.mark.parametrize("avx512_bf16, amx, fast", [(False, False, False), (True, False, True), (False, True, True)])
def test_fast_bf16_follows_the_cpus_bf16_instructions(monkeypatch, avx512_bf16, amx, fast):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    assert awq_module.fast_bf16(torch.device("cpu")) is fast
