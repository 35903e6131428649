"""GGUF block types against the references: the `gguf` package (legacy quantize, all dequantize)
and llama.cpp's own encoders (golden vectors in tests/golden, see its README); Q4_X; imatrix I/O."""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowbit.errors import LowbitError
from lowbit.formats.gguf import (BLOCK_TYPES, GGUF_FORMATS, Imatrix, ImatrixEntry, Q4_0, fallback_type, q4x_bytes,
                                 q4x_fidelity, q4x_quantized, read_dat, read_imatrix, write_dat, write_gguf)

GOLDEN = Path(__file__).parent / "golden"
LEGACY = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"]
KQUANTS = ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]
SETTINGS = settings(max_examples=15, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _ggml(t: str) -> GGMLQuantizationType:
    return GGMLQuantizationType[t.upper()]


def _fmt(t: str):
    return GGUF_FORMATS[f"gguf:{t}"]()


def _weights(seed: int, rows: int, blocks: int, block: int, kind: str) -> np.ndarray:
    """float32 [rows, blocks·block]: mixtures of zeros, constant blocks, wide dynamic ranges."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((rows, blocks * block))
    if kind == "ranges":   # every block at its own scale, 1e-4 … 1e3
        W *= np.repeat(10.0 ** rng.uniform(-4, 3, (rows, blocks)), block, axis=1)
    elif kind == "specials":
        W *= 10.0 ** rng.uniform(-2, 2, (rows, 1))
        W[0, :block] = 0
        W[-1, block // 2] *= 50
        if blocks > 1:
            W[0, block:2 * block] = rng.uniform(-1, 1)                     # constant block
        W[rows // 2, -block:] = np.abs(W[rows // 2, -block:])              # one-signed block
        W[:, 3] = np.where(rng.random(rows) < 0.5, 0.0, W[:, 3])
    elif kind == "sparse":
        W *= rng.random(W.shape) < 0.1
    # +0.0 only: which of ±0 a numpy min returns is unspecified, so gguf-py's stored sign is too
    return (W + 0.0).astype(np.float32)


def weights(block: int, max_blocks: int):
    return st.builds(_weights, st.integers(0, 2**31 - 1), st.integers(1, 6), st.integers(1, max_blocks),
                     st.just(block), st.sampled_from(["gauss", "ranges", "specials", "sparse"]))


def test_block_table_matches_gguf():
    for t, bt in BLOCK_TYPES.items():
        assert GGML_QUANT_SIZES[_ggml(t)] == (bt.block_size, bt.type_size)
        assert _ggml(t).value == bt.ggml_type


# -- legacy blocks: byte-identical to gguf-py (itself identical to llama-quantize --pure) ---------

@pytest.mark.parametrize("t", LEGACY)
@SETTINGS
@given(W=weights(32, 12))
def test_legacy_bytes_identical_to_gguf(t, W):
    ours = _fmt(t).to_bytes(torch.from_numpy(W))
    ref = gq.quantize(W, _ggml(t))
    assert ours.dtype == np.uint8 and np.array_equal(ours, ref)


@pytest.mark.parametrize("t", LEGACY + KQUANTS)
def test_decode_identical_to_gguf_on_arbitrary_blocks(t):
    """Any block bytes (finite fp16 scales) decode exactly like gguf.quants.dequantize."""
    bt = BLOCK_TYPES[t]
    rng = np.random.default_rng(bt.ggml_type)
    data = rng.integers(0, 256, (24, 2 * bt.type_size), dtype=np.uint8)
    halves = data.reshape(-1, bt.type_size).view(np.uint8)
    # keep the fp16 fields finite: clear the top exponent bit of every fp16 scale
    pos = {"q4_0": [0], "q4_1": [0, 2], "q5_0": [0], "q5_1": [0, 2], "q8_0": [0], "q2_k": [80, 82],
           "q3_k": [108], "q4_k": [0, 2], "q5_k": [0, 2], "q6_k": [208]}[t]
    for p in pos:
        halves[:, p + 1] &= 0x3F
    fmt = _fmt(t)
    ours = fmt.from_bytes(data).numpy()
    assert np.array_equal(ours, gq.dequantize(data, _ggml(t)))
    # and what unpack read packs back to blocks that decode the same
    again = fmt.pack(fmt.unpack({"weight_blocks": torch.from_numpy(data)}))["weight_blocks"]
    assert np.array_equal(gq.dequantize(again.numpy(), _ggml(t)), ours)


# -- K-quants: our bytes decode under gguf exactly as we decode them ---------------------------

@pytest.mark.parametrize("t", KQUANTS)
@settings(max_examples=5, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(W=weights(256, 2), imatrix=st.booleans())
def test_kquant_bytes_decode_under_gguf(t, W, imatrix):
    fmt = _fmt(t)
    imp = torch.from_numpy(np.random.default_rng(0).lognormal(size=W.shape[1]).astype(np.float32)) if imatrix else None
    qt = fmt.encode(torch.from_numpy(W), importance=imp)
    data = fmt.pack(qt)["weight_blocks"].numpy()
    assert data.shape == (W.shape[0], W.shape[1] // 256 * BLOCK_TYPES[t].type_size)
    assert np.array_equal(gq.dequantize(data, _ggml(t)), qt.dequantize().numpy())


# -- llama.cpp's own encoders (golden vectors) --------------------------------------------------

GOLDEN_CASES = ["gauss", "heavy", "special"]


@pytest.fixture(scope="module")
def golden():
    return np.load(GOLDEN / "llama_cpp_quants.npz")


@pytest.mark.parametrize("t", LEGACY + KQUANTS)
def test_bytes_identical_to_llama_cpp(golden, t):
    """quantize_<type>() without an imatrix, i.e. llama-quantize --pure (ggml-quants.c)."""
    for case in GOLDEN_CASES:
        W = torch.from_numpy(golden[f"{case}/W"])
        assert np.array_equal(_fmt(t).to_bytes(W), golden[f"{case}/{t}"]), case


@pytest.mark.parametrize("t", [t for t in LEGACY + KQUANTS if t != "q8_0"])
def test_imatrix_encoders_match_llama_cpp(golden, t):
    """With an importance vector: the same decoded weights as llama.cpp everywhere; the same bytes
    except where a K-quant super-block's fp16 scale splits into d·sc in more than one way."""
    fmt = _fmt(t)
    n_blocks = n_same = 0
    for case in GOLDEN_CASES:
        W = torch.from_numpy(golden[f"{case}/W"])
        ref = golden[f"{case}/{t}.imatrix"]
        ours = fmt.to_bytes(W, importance=torch.from_numpy(golden[f"{case}/imatrix"]))
        assert np.array_equal(gq.dequantize(ours, _ggml(t)), gq.dequantize(ref, _ggml(t))), case
        ts = BLOCK_TYPES[t].type_size
        same = (ours.reshape(-1, ts) == ref.reshape(-1, ts)).all(1)
        n_blocks, n_same = n_blocks + same.size, n_same + int(same.sum())
    assert n_same == n_blocks if t in LEGACY else n_same >= n_blocks - 2


@pytest.mark.parametrize("t", ["q4_k", "q6_k"])
def test_reconstruction_error_matches_llama_cpp(golden, t):
    for case in GOLDEN_CASES:
        W = golden[f"{case}/W"]
        for suffix, imp in (("", None), (".imatrix", torch.from_numpy(golden[f"{case}/imatrix"]))):
            ours = _fmt(t).from_bytes(_fmt(t).to_bytes(torch.from_numpy(W), importance=imp)).numpy()
            ref = gq.dequantize(golden[f"{case}/{t}{suffix}"], _ggml(t))
            assert ((ours - W) ** 2).sum() <= 1.05 * ((ref - W) ** 2).sum()


def test_importance_protects_the_weighted_columns():
    rng = np.random.default_rng(3)
    W = torch.from_numpy(rng.standard_normal((32, 512)).astype(np.float32))
    imp = torch.ones(512)
    imp[::16] = 1000.0
    for t in ["q4_0", "q4_1", "q3_k", "q4_k", "q6_k"]:
        fmt = _fmt(t)
        plain = (fmt.fake_quantize(W) - W)[:, ::16].pow(2).sum()
        weighted = (fmt.fake_quantize(W, importance=imp) - W)[:, ::16].pow(2).sum()
        assert weighted < plain, t


def test_fallback_type():
    assert fallback_type("q4_k", 576) == "q5_0"
    assert fallback_type("q5_k", 896) == "q5_1"
    assert fallback_type("q6_k", 576) == "q8_0"
    assert fallback_type("q2_k", 576) == "q4_0"
    assert fallback_type("q4_k", 4096) == "q4_k"
    assert fallback_type("q4_k", 100) == "f16"
    assert fallback_type("q8_0", 100) == "f16"
    with pytest.raises(KeyError):
        fallback_type("q7_k", 256)


# -- Q4_X -----------------------------------------------------------------------------------------

def _int4_checkpoint(seed: int, out: int = 64, in_f: int = 512):
    g = torch.Generator().manual_seed(seed)
    codes = torch.round(torch.randn(out, in_f, generator=g) * 2.5).clamp(-8, 7).to(torch.int8)
    scales = (torch.rand(out, in_f // 32, generator=g) * 0.02 + 1e-3).to(torch.bfloat16).float()
    return codes, scales


def test_q4x_reproduces_int4_exactly():
    codes, scales = _int4_checkpoint(0)
    W = codes.float() * scales.repeat_interleave(32, 1)
    data = q4x_bytes(codes, scales)
    assert np.array_equal(gq.dequantize(data, GGMLQuantizationType.Q4_0), W.numpy())
    qt = q4x_quantized(codes, scales)
    assert torch.equal(qt.W_q.long() - 8, codes.long()) and torch.equal(qt.qparams.scale, scales)
    fid = q4x_fidelity(codes, scales)
    assert fid["q4_x"].max_abs_err == 0 and fid["q4_x"].cosine == pytest.approx(1.0, abs=1e-12)
    assert 1e-3 < fid["q4_0"].rel_max_abs_err < 0.2 and fid["q4_0"].cosine < 1.0


def test_q4x_refuses_what_is_not_int4_group32():
    codes, scales = _int4_checkpoint(1, 4, 64)
    with pytest.raises(LowbitError):
        q4x_bytes(codes.to(torch.int16) * 2, scales)
    with pytest.raises(LowbitError):
        q4x_bytes(codes, scales[:, :1])


def test_q4x_is_plain_q4_0_when_the_block_holds_minus_eight():
    codes, scales = _int4_checkpoint(2, 8, 64)
    codes[:, ::32] = -8  # the absmax code: Q4_0's own d = max/−8 = scale
    assert np.array_equal(q4x_bytes(codes, scales), Q4_0().to_bytes(codes.float() * scales.repeat_interleave(32, 1)))


# -- imatrix files -------------------------------------------------------------------------------

def _legacy_bytes() -> bytes:
    e1 = np.array([1.5, 2.0, 0.25, 4.0], np.float32)
    e2 = np.array([3.0, 9.0], np.float32)
    out = struct.pack("<i", 2)
    for name, ncall, vals in (("blk.0.attn_q.weight", 4, e1), ("output.weight", 2, e2)):
        out += struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", ncall, vals.size) + vals.tobytes()
    return out + struct.pack("<ii", 10, 9) + b"sotu.txt "[:9]


def test_imatrix_legacy_read_write(tmp_path):
    raw = _legacy_bytes()
    (tmp_path / "a.dat").write_bytes(raw)
    im = read_imatrix(tmp_path / "a.dat")
    assert im.chunk_count == 10 and im.datasets == ["sotu.txt "]
    assert np.array_equal(im.importance("blk.0.attn_q.weight"), np.array([1.5, 2.0, 0.25, 4.0], np.float32) / 4)
    assert np.array_equal(im.importance("output.weight"), np.array([1.5, 4.5], np.float32))
    write_dat(im, tmp_path / "b.dat")
    assert (tmp_path / "b.dat").read_bytes() == raw
    # a file from before the dataset trailer
    (tmp_path / "c.dat").write_bytes(raw[: -(8 + 9)])
    assert read_dat(tmp_path / "c.dat").datasets == []


def test_imatrix_gguf_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    im = Imatrix({
        "blk.0.ffn_down_exps.weight": ImatrixEntry(rng.random((3, 8), dtype=np.float32) * 512,
                                                   np.array([512, 0, 1024], np.float32)),
        "blk.0.attn_k.weight": ImatrixEntry(rng.random((1, 16), dtype=np.float32) * 2048, np.array([2048.0]),
                                            rng.standard_normal((1, 16)).astype(np.float32)),
    }, datasets=["calib.txt"], chunk_count=4, chunk_size=512)
    write_gguf(im, tmp_path / "im.gguf")
    back = read_imatrix(tmp_path / "im.gguf")
    assert back.datasets == ["calib.txt"] and back.chunk_count == 4 and back.chunk_size == 512
    for name, e in im.entries.items():
        b = back.entries[name]
        assert np.array_equal(b.in_sum2, e.in_sum2) and np.array_equal(b.counts, e.counts)
        assert (b.in_sum is None) == (e.in_sum is None)
    exps = back.importance("blk.0.ffn_down_exps.weight")
    assert exps.shape == (3, 8) and np.all(exps[1] == 1)  # a matrix without data gets 1, as llama-quantize
    assert np.allclose(exps[0], im.entries["blk.0.ffn_down_exps.weight"].in_sum2[0] / 512)
    # GGUF -> legacy keeps what llama-quantize would read
    write_dat(back, tmp_path / "im.dat")
    dat = read_dat(tmp_path / "im.dat")
    assert np.allclose(dat.importance("blk.0.attn_k.weight"), back.importance("blk.0.attn_k.weight"), rtol=1e-6)
