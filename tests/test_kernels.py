"""W4A16 runtime: layouts, the dequantize-FMA identity, QuantLinear, lowbit.load and the Decoder.

CPU tests run everywhere. Tests marked by `needs_gpu` run only where CUDA and Triton are (the
device machine): the kernels must equal dequantize-then-matmul on odd shapes, for every
configuration the tuner may pick.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit.formats.int import IntFormat
from lowbit.kernels import QuantLinear, decode_ops, reference, triton_available
from lowbit.kernels.layout import pack_int4_cols, pack_kernel, unpack_checkpoint, unpack_kernel
from lowbit.runtime import Decoder, quantize_linears_
from conftest import make_tiny_config

QUICK = dict(n_calib=4, seq_len=32, progress=False)
needs_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and triton_available()),
                               reason="needs a CUDA GPU and Triton")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def random_packed(N: int, K: int, gs: int, sym: bool, dtype=torch.float16, device="cpu"):
    """Random codes, positive scales, zeros: kernel-layout tensors plus the codes they hold."""
    W_q = torch.randint(0, 16, (N, K), dtype=torch.uint8, device=device)
    scales = (torch.rand(K // gs, N, device=device) * 0.02 + 1e-3).to(dtype)
    zeros = None if sym else torch.randint(0, 16, (K // gs, N), dtype=torch.uint8, device=device)
    return pack_kernel(W_q), scales, zeros, W_q


# ---- layouts -----------------------------------------------------------------------------------

def test_checkpoint_unpack_inverts_compressed_tensors_packing():
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    N, K, G = 37, 96, 3  # rows not a multiple of 8: the zero points are padded
    W_q = torch.randint(0, 16, (N, K), dtype=torch.uint8)
    zero = torch.randint(0, 16, (N, G), dtype=torch.uint8)
    # exactly what lowbit.export.compressed_tensors.convert writes
    packed = pack_to_int32((W_q.to(torch.int16) - 8).to(torch.int8), 4)
    zp = pack_to_int32((zero.to(torch.int16) - 8).to(torch.int8), 4, packed_dim=0)
    got_q, got_z = unpack_checkpoint(packed, (N, K), zp)
    assert torch.equal(got_q, W_q) and torch.equal(got_z, zero)
    assert torch.equal(pack_int4_cols(W_q), packed)


@pytest.mark.parametrize("K", [64, 96, 128, 384, 1000])
def test_kernel_layout_round_trip_and_interleave(K):
    W_q = torch.randint(0, 16, (5, K), dtype=torch.uint8)
    qw = pack_kernel(W_q)
    assert qw.shape == (-(-K // 128), 5, 16) and qw.dtype == torch.int32
    assert torch.equal(unpack_kernel(qw, K), W_q)
    # word r = 2u + h, nibble c = b + 4e of (span s, row n) holds column 128·s + 16·(b + 4h) + 2u + e
    for s in range(qw.shape[0]):
        for r, c in [(0, 0), (5, 6), (14, 3), (15, 7)]:
            u, h, b, e = r // 2, r % 2, c % 4, c // 4
            col = 128 * s + 16 * (b + 4 * h) + 2 * u + e
            want = W_q[2, col].item() if col < K else 0
            assert (qw[s, 2, r].item() >> (4 * c)) & 0xF == want


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dequant_fma_is_exact(dtype):
    """Exact for 16-bit scales; float32 scales round the constant b once (relative 2^-24)."""
    q = torch.randint(0, 16, (4096,))
    z = torch.randint(0, 16, (4096,)).float()
    s = (torch.randn(4096).abs() * 0.05 + 1e-4).to(dtype)
    for zero in (z, 8.0):
        want = (q.float() - zero) * s.float()
        got = reference.dequant_fma(q, s, zero)
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=0, atol=float(s.max()) * 2 ** -18)
        else:
            assert torch.equal(got, want)


# ---- QuantLinear on CPU -----------------------------------------------------------------------

@pytest.mark.parametrize("sym,gs", [(False, 32), (True, 64), (False, 128)])
def test_quantlinear_cpu_equals_fake_quant(sym, gs):
    lin = nn.Linear(256, 72, bias=True)
    fmt = IntFormat(4, gs, sym=sym)
    ql = QuantLinear.from_linear(lin, fmt)
    x = torch.randn(3, 5, 256)
    W_r = fmt.fake_quantize(lin.weight.detach())
    want = x @ W_r.t() + lin.bias.detach()
    torch.testing.assert_close(ql(x), want, rtol=1e-5, atol=1e-5)
    acc = torch.randn(3, 5, 72)
    torch.testing.assert_close(ql(x, accumulate_into=acc.clone()), acc + want, rtol=1e-5, atol=1e-5)


def test_quantlinear_cat_equals_parts():
    fmt = IntFormat(4, 32)
    parts = [QuantLinear.from_linear(nn.Linear(96, n), fmt) for n in (40, 8, 8)]
    x = torch.randn(2, 96)
    torch.testing.assert_close(QuantLinear.cat(parts)(x), torch.cat([p(x) for p in parts], -1))


# ---- lowbit.load and the Decoder on CPU ---------------------------------------------------------

@pytest.mark.parametrize("sym", [False, True])
def test_load_gives_fake_quant_logits(sym, tiny_llama, tmp_path):
    from lowbit.eval.evaluate import load_causal_lm
    ct = lowbit.quantize(tiny_llama, tmp_path / "ct", bits=4, group_size=32, sym=sym, **QUICK)
    fake = lowbit.quantize(tiny_llama, tmp_path / "fake", bits=4, group_size=32, sym=sym,
                           export_format="fake", **QUICK)
    model = lowbit.load(ct)
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, QuantLinear) and isinstance(layer.mlp.down_proj, QuantLinear)
    assert (layer.mlp.down_proj.zeros is None) == sym
    assert not isinstance(model.lm_head, QuantLinear)  # lowbit leaves the lm_head in float by default
    m_fake, _ = load_causal_lm(str(fake))
    ids = torch.randint(3, 300, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, m_fake(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_load_refuses_plain_checkpoint(tiny_llama):
    from lowbit.errors import LowbitError
    with pytest.raises(LowbitError, match="quantization_config"):
        lowbit.load(tiny_llama)


def greedy_reference(model, ids: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens by full forward passes (no cache), and the logits of the last step."""
    seq = ids
    for _ in range(n):
        logits = model(input_ids=seq).logits[:, -1]
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
    return seq, logits


@pytest.mark.parametrize("quantized", [False, True])
def test_decoder_matches_transformers_greedy_cpu(quantized, tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM
    if quantized:
        model = lowbit.load(lowbit.quantize(tiny_llama, tmp_path / "ct", bits=4, group_size=32, **QUICK))
    else:
        model = AutoModelForCausalLM.from_pretrained(tiny_llama, use_kernels=False).eval()
    ids = torch.randint(3, 300, (1, 7))
    dec = Decoder(model, max_len=32, use_graph=False)
    with torch.no_grad():
        want, logits = greedy_reference(model, ids, 10)
    assert torch.equal(dec.generate(ids, 10), want)
    torch.testing.assert_close(dec.logits.float(), logits, rtol=1e-4, atol=1e-4)


# ---- GPU: the Triton kernels -------------------------------------------------------------------

def _check_kernel(M, N, K, gs, sym, dtype, configs=None, accumulate=False, pro=None):
    """Every configuration (or `configs`) against dequantize-then-matmul in float64; pro: the X
    prologue, None, "norm" (rms_norm(x) · γ) or "glu" (silu(gate) · up of x = gate|up)."""
    from lowbit.kernels.triton_w4a16 import candidates, launch, _sm_count
    dev = torch.device("cuda")
    qw, s, z, _ = random_packed(N, K, gs, sym, dtype, dev)
    x = torch.randn(M, 2 * K if pro == "glu" else K, device=dev).to(dtype)
    X, norm = x.double(), None
    if pro == "norm":
        gamma = (torch.rand(K, device=dev) + 0.5).to(dtype)
        norm = (gamma, 1e-5)
        X = X * torch.rsqrt(X.pow(2).mean(-1, keepdim=True) + 1e-5) * gamma.double()
    elif pro == "glu":
        X = torch.nn.functional.silu(X[:, :K]) * X[:, K:]
    want = X @ reference.dequantize(qw, s, z, K, torch.float64).t()
    tol = 4e-3 if dtype == torch.float16 else 2e-2
    cands = [c for c in candidates(M, N, K, _sm_count(dev)) if not (pro == "norm" and c.atomic)]
    for cfg in configs or cands:
        base = torch.randn(M, N, device=dev).to(dtype) if accumulate else None
        out = base.clone() if accumulate else torch.full((M, N), float("nan"), dtype=dtype, device=dev)
        launch(cfg, x, qw, s, z, out, K, accumulate, norm=norm, glu=pro == "glu")
        torch.cuda.synchronize()
        assert torch.isfinite(out).all(), f"{cfg}: unwritten or non-finite output"
        got = out.double() - (base.double() if accumulate else 0)
        assert rel_err(got, want) < tol, f"{cfg}: rel err {rel_err(got, want):.2e}"


@needs_gpu
@pytest.mark.parametrize("M", [1, 5, 33])
def test_every_candidate_equals_dequant_matmul(M):
    """Each configuration the tuner may choose, asymmetric g128 fp16, an odd N."""
    _check_kernel(M, 1001, 384, 128, False, torch.float16)


@needs_gpu
@pytest.mark.parametrize("gs,sym,dtype,K", [(32, True, torch.bfloat16, 352), (64, False, torch.bfloat16, 320),
                                            (128, True, torch.float16, 640), (32, False, torch.float16, 96)])
@pytest.mark.parametrize("M", [1, 6, 40])
def test_kernel_odd_shapes(gs, sym, dtype, K, M):
    from lowbit.kernels.triton_w4a16 import candidates, _sm_count
    cands = candidates(M, 777, K, _sm_count(torch.device("cuda")))
    picks = [cands[0], next((c for c in cands if c.split_k > 1), cands[-1]), cands[-1]]
    _check_kernel(M, 777, K, gs, sym, dtype, configs=picks)


@needs_gpu
@pytest.mark.parametrize("M", [1, 7, 64])
def test_kernel_accumulate(M):  # the decoder adds o_proj/down_proj outputs into the residual this way
    from lowbit.kernels.triton_w4a16 import candidates, _sm_count
    cands = candidates(M, 512, 1024, _sm_count(torch.device("cuda")))
    _check_kernel(M, 512, 1024, 64, False, torch.float16, configs=[cands[0], cands[-1]], accumulate=True)


@needs_gpu
@pytest.mark.parametrize("pro", ["norm", "glu"])
@pytest.mark.parametrize("M", [1, 5, 33])
def test_kernel_prologues(pro, M):  # the decoder's RMSNorm and SiLU·up, computed as the kernel loads X
    """Every candidate (split-K ones included: K = 960 is 7.5 spans), accumulating as the decoder does."""
    _check_kernel(M, 1001, 960, 64, False, torch.float16, accumulate=True, pro=pro)
    _check_kernel(M, 300, 640, 32, True, torch.bfloat16, pro=pro)


@needs_gpu
def test_quantlinear_gpu_tuned_path_and_odd_batch():
    lin = nn.Linear(640, 300, bias=True, device="cuda", dtype=torch.float16)
    ql = QuantLinear.from_linear(lin, IntFormat(4, 64, scale_dtype=torch.float16))
    for M in (1, 17):
        x = torch.randn(M, 640, device="cuda", dtype=torch.float16)
        want = x.double() @ ql.dequantize(torch.float64).t() + lin.bias.double()
        assert rel_err(ql(x), want) < 4e-3


@needs_gpu
def test_decode_ops_triton_equal_torch():
    dev, dt = torch.device("cuda"), torch.float16
    hq, hkv, D, L = 8, 2, 64, 96
    x, w = torch.randn(1, 512, device=dev, dtype=dt), torch.randn(512, device=dev, dtype=dt)
    assert rel_err(decode_ops.rms_norm(x, w, 1e-5), decode_ops.rms_norm(x.float(), w.float(), 1e-5)) < 2e-3
    gu = torch.randn(1, 2 * 700, device=dev, dtype=dt)
    assert rel_err(decode_ops.silu_mul(gu), decode_ops.silu_mul(gu.float())) < 2e-3
    qkv = torch.randn(1, (hq + 2 * hkv) * D, device=dev, dtype=dt)
    ang = torch.rand(L, D // 2, device=dev) * 6
    for p in (0, 37, L - 1):  # an empty cache before pos, one tile and a half, a full cache
        at = torch.tensor([p], device=dev)
        kc, vc = torch.randn(hkv, L, D, device=dev, dtype=dt), torch.randn(hkv, L, D, device=dev, dtype=dt)
        kf, vf = kc.float(), vc.float()
        o = decode_ops.rope_attention(qkv, ang.cos(), ang.sin(), at, kc, vc, hq, hkv, D ** -0.5)
        of = decode_ops.rope_attention(qkv.float(), ang.cos(), ang.sin(), at, kf, vf, hq, hkv, D ** -0.5)
        assert rel_err(o, of) < 3e-3 and rel_err(kc, kf) < 2e-3 and rel_err(vc, vf) < 2e-3


def _next_token_case(logits: torch.Tensor) -> tuple[int, int, int]:
    tok, pos = torch.zeros(1, dtype=torch.long, device=logits.device), torch.tensor([5], device=logits.device)
    tokens = torch.full((12,), -1, dtype=torch.long, device=logits.device)
    decode_ops.next_token_(logits, tok, tokens, pos)
    assert int(tokens[6]) == int(tok) and (tokens[:6] == -1).all() and (tokens[7:] == -1).all()
    return int(tok), int(pos), int(tokens[6])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_gpu)])
def test_next_token_is_first_argmax_and_advances(device):
    """The decode step's bookkeeping: tok = tokens[pos + 1] = first maximum (NaN counts as one, as
    torch.argmax has it), pos + 1; on CUDA a two-pass Triton reduction across block boundaries."""
    V = 128256
    logits = torch.randn(1, V, device=device).half()
    for at in (0, 2047, 2048, 70001, V - 1):  # block edges of the Triton pass included
        logits[0, at] = 50.0
        assert _next_token_case(logits) == (at, 6, at)
        logits[0, at] = 0.0
    logits[0, 9000] = logits[0, 130] = 60.0  # a tie across blocks: the first index
    assert _next_token_case(logits)[0] == 130
    logits[0, 4242] = float("nan")
    assert _next_token_case(logits)[0] == int(logits.float().argmax(-1)) == 4242


def test_quantlinear_prologues_cpu():
    """The norm / glu inputs of QuantLinear (fused into the kernel on CUDA) on the CPU fallback."""
    lin = nn.Linear(128, 48)
    ql = QuantLinear.from_linear(lin, IntFormat(4, 32))
    h, w = torch.randn(3, 128), torch.rand(128) + 0.5
    want = ql(h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5) * w)
    torch.testing.assert_close(ql(h, norm=(w, 1e-5)), want)
    gu = torch.randn(3, 256)
    torch.testing.assert_close(ql(gu, glu=True), ql(nn.functional.silu(gu[:, :128]) * gu[:, 128:]))


@needs_gpu
@pytest.mark.parametrize("quantized", [False, True])
def test_decoder_graph_gpu_matches_transformers(quantized):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_tiny_config("llama", hidden_size=256, intermediate_size=512,
                                                              head_dim=64), dtype=torch.float16).cuda().eval()
    if quantized:
        quantize_linears_(model, IntFormat(4, 32, scale_dtype=torch.float16))
    ids = torch.randint(3, 300, (1, 9), device="cuda")
    with torch.no_grad():
        want = model(input_ids=ids).logits[:, -1].float()
    dec = Decoder(model, max_len=64, use_graph=True)
    out = dec.generate(ids, 20)
    assert dec.graph is not None and out.shape == (1, 29) and torch.equal(out[:, :9], ids)
    eager = Decoder(model, max_len=64, use_graph=False)
    eager.prefill(ids)
    assert rel_err(eager.logits.float(), want) < 2e-2
    dec.prefill(ids)
    assert rel_err(dec.logits.float(), want) < 2e-2


@needs_gpu
def test_decoder_tune_keeps_tokens_and_picks_a_candidate_per_shape():
    from transformers import LlamaConfig, AutoModelForCausalLM
    from lowbit.kernels import triton_w4a16
    from lowbit.runtime import Decoder, quantize_linears_
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float16).eval()
    quantize_linears_(model, IntFormat(4, 64, sym=False, scale_dtype=torch.float16))
    dec = Decoder(model, 48)
    prompt = torch.randint(0, 512, (1, 5), device="cuda")
    before = dec.generate(prompt, 12)
    chosen = dec.tune(steps=8)
    assert len(chosen) == 4  # qkv, o, gate_up, down (the lm_head stays float)
    for key, c in chosen.items():
        assert c in triton_w4a16._candidates_of(key)
    assert torch.equal(dec.generate(prompt, 12), before)
