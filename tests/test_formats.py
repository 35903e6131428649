"""Every registered format through the same round-trip and property tests, then golden checks
against the reference implementations (compressed-tensors, bitsandbytes' committed vectors)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowbit.errors import LowbitError
from lowbit.formats import FORMATS, QuantizedTensor, make_format
from lowbit.formats.fp8 import FP8E4M3Format, FP8E5M2Format
from lowbit.formats.gguf import GGUF_FORMATS, GGUFShapeError
from lowbit.formats.int import IntFormat
from lowbit.formats.mxfp4 import E2M1_VALUES, MXFP4Format, e2m1_codes, e2m1_values
from lowbit.formats.nf4 import NF4Format, dynamic_code
from lowbit.formats.nvfp4 import NVFP4Format
from lowbit.spec import QuantScheme

GOLDEN = Path(__file__).parent / "golden"
SETTINGS = settings(max_examples=6, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _registered(name: str):
    return make_format(QuantScheme(format=name, bits=4, group_size=64))


# Every registered name, plus the variants a name alone does not reach.
VARIANTS = {name: (lambda n=name: _registered(n)) for name in FORMATS}
VARIANTS.update({
    "int2-asym-g32": lambda: IntFormat(bits=2, group_size=32, sym=False),
    "int3-sym-g64": lambda: IntFormat(bits=3, group_size=64, sym=True),
    "int8-per-channel": lambda: IntFormat(bits=8, group_size=0, sym=False),
    "int4-bf16-scales": lambda: IntFormat(bits=4, group_size=128, sym=True, scale_dtype=torch.bfloat16),
    "nf4-g128-double-quant": lambda: NF4Format(group_size=128, double_quant=True),
    "fp8_e4m3-per-tensor": lambda: FP8E4M3Format(per_tensor=True),
    "fp8_e4m3-per-channel": lambda: FP8E4M3Format(group_size=0),
    "fp8_e5m2-g32": lambda: FP8E5M2Format(group_size=32),
})


def _weights(seed: int, out: int, in_f: int, kind: str) -> torch.Tensor:
    """Test weights: Gaussian rows at very different scales, with blocks that are zero, constant,
    one-signed or hold an outlier."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, in_f, generator=g)
    if kind == "heavy":
        W = W ** 3
    W = W * torch.logspace(-2, 2, out)[torch.randperm(out, generator=g)][:, None]
    if kind == "specials":
        W[0, :64] = 0.0
        if out > 1:
            W[1, 32:96] = 0.75
        if out > 2:
            W[2] = W[2].abs()
        W[-1, in_f // 2] *= 40
    return W


weights = st.builds(_weights, st.integers(0, 2**31 - 1), st.integers(1, 5), st.sampled_from([256, 512]),
                    st.sampled_from(["gauss", "specials", "heavy"]))


def _nonzero_groups(fmt, qt: QuantizedTensor) -> torch.Tensor:
    gl = fmt.group_length(qt.W_q.shape[1])
    return (qt.qparams.scale != 0).repeat_interleave(gl, dim=1)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@SETTINGS
@given(W=weights)
def test_round_trip_properties(variant, W):
    fmt = VARIANTS[variant]()
    out_f, in_f = W.shape
    qt = fmt.encode(W)
    n_groups = fmt.groups(in_f)
    assert qt.W_q.shape == W.shape
    assert qt.qparams.scale.shape == qt.qparams.zero.shape == (out_f, n_groups)
    W_r = qt.dequantize()
    assert W_r.dtype == torch.float32 and torch.isfinite(W_r).all()
    assert (W_r - W).norm() <= 0.5 * W.norm() + 1e-12

    # the codes are a fixed point of the grid: re-encoding the reconstruction gives the same codes
    again = fmt.quantize(W_r, qt.qparams)
    live = _nonzero_groups(fmt, qt)
    assert torch.equal(again[live], qt.W_q[live])
    assert torch.equal(fmt.dequantize(again, qt.qparams), W_r)

    # GPTQ's use of the grid: one column at a time, per-row scale/zero broadcast
    W_q = fmt.quantize(W, qt.qparams)
    gl = fmt.group_length(in_f)
    for j in (0, gl - 1, in_f // 2 + 1, in_f - 1):
        g = j // gl
        s, z = qt.qparams.scale[:, g:g + 1], qt.qparams.zero[:, g:g + 1]
        col = fmt.quantize_elementwise(W[:, j:j + 1], s, z)
        assert torch.equal(col, W_q[:, j:j + 1])
        assert torch.equal(fmt.dequantize_elementwise(col, s, z), fmt.dequantize(W_q, qt.qparams)[:, j:j + 1])

    # storage: unpack is the exact inverse of pack
    packed = fmt.pack(qt)
    back = fmt.unpack(packed)
    assert torch.equal(back.W_q, qt.W_q)
    if getattr(fmt, "double_quant", False):  # the stored absmax is compressed, as bitsandbytes does
        err = (back.qparams.scale - qt.qparams.scale).abs().max()
        assert err <= 0.01 * qt.qparams.scale.max()  # 8-bit dynamic code on absmax − mean
        return
    assert torch.equal(back.qparams.scale, qt.qparams.scale)
    assert torch.equal(back.qparams.zero, qt.qparams.zero)
    assert torch.equal(back.dequantize(), W_r)
    repacked = fmt.pack(back)
    assert packed.keys() == repacked.keys()
    for k in packed:
        assert torch.equal(packed[k].view(torch.uint8) if packed[k].dtype.itemsize == 1 else packed[k],
                           repacked[k].view(torch.uint8) if repacked[k].dtype.itemsize == 1 else repacked[k]), k


def test_every_registered_name_builds_from_a_scheme():
    for name in FORMATS:
        fmt = _registered(name)
        assert fmt.name == name
        assert fmt.bits_per_weight(512) > 0


@pytest.mark.parametrize("variant, in_f, bpw", [
    ("int", 512, 4 + 20 / 64),                      # int4 asym g64: 16-bit scale + 4-bit zero per 64
    ("nf4", 512, 4 + 32 / 64),
    ("nf4-g128-double-quant", 512, 4 + 8 / 128 + 32 / (256 * 128)),
    ("fp8_e4m3", 512, 8 + 32 / 64),
    ("fp8_e4m3-per-channel", 512, 8 + 32 / 512),
    ("fp8_e4m3-per-tensor", 512, 8.0),
    ("mxfp4", 512, 4.25),
    ("nvfp4", 512, 4.5),
    ("gguf:q4_0", 512, 4.5), ("gguf:q4_1", 512, 5.0), ("gguf:q5_0", 512, 5.5), ("gguf:q5_1", 512, 6.0),
    ("gguf:q8_0", 512, 8.5), ("gguf:q2_k", 512, 2.625), ("gguf:q3_k", 512, 3.4375),
    ("gguf:q4_k", 512, 4.5), ("gguf:q5_k", 512, 5.5), ("gguf:q6_k", 512, 6.5625),
])
def test_bits_per_weight(variant, in_f, bpw):
    assert VARIANTS[variant]().bits_per_weight(in_f) == pytest.approx(bpw)


# per-tensor constants (code books, global scales, shapes) are not per-weight storage
_CONSTANTS = {"quant_map", "nested_quant_map", "nested_offset", "shape", "weight_global_scale", "weight_shape"}


@pytest.mark.parametrize("variant", [v for v in sorted(VARIANTS) if not v.startswith(("int", "fp8_e4m3-per-t"))])
def test_bits_per_weight_matches_the_packed_bytes(variant):
    fmt = VARIANTS[variant]()
    W = _weights(0, 8, 2048, "gauss")
    packed = fmt.pack(fmt.encode(W))
    n_bytes = sum(t.numel() * t.element_size() for k, t in packed.items() if k not in _CONSTANTS)
    if variant == "nf4-g128-double-quant":  # nested absmax: one float32 per 256 blocks, rounded up
        n_bytes -= packed["nested_absmax"].numel() * 4
        n_bytes += W.numel() / (128 * 256) * 4
    assert n_bytes * 8 / W.numel() == pytest.approx(fmt.bits_per_weight(W.shape[1]))


def test_int_pack_matches_compressed_tensors():
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    g = torch.Generator().manual_seed(1)
    for bits in range(2, 9):
        for in_f in (37, 96, 100):
            fmt = IntFormat(bits=bits, group_size=0, sym=False)
            W = torch.randn(7, in_f, generator=g)
            qt = fmt.encode(W)
            offset = 1 << (bits - 1)
            ref = pack_to_int32((qt.W_q.to(torch.int16) - offset).to(torch.int8), bits)
            packed = fmt.pack(qt)
            assert torch.equal(packed["weight_packed"], ref), (bits, in_f)
            ref_zero = pack_to_int32((qt.qparams.zero.to(torch.int16) - offset).to(torch.int8), bits, packed_dim=0)
            assert torch.equal(packed["weight_zero_point"], ref_zero)


def test_int_pack_keeps_act_order_groups():
    fmt = IntFormat(bits=4, group_size=32, sym=True)
    qt = fmt.encode(torch.randn(4, 64))
    qt = QuantizedTensor(qt.W_q, qt.qparams, fmt, torch.randperm(64).to(torch.int32) // 32)
    back = fmt.unpack(fmt.pack(qt))
    assert torch.equal(back.g_idx, qt.g_idx) and torch.equal(back.dequantize(), qt.dequantize())


# -- NF4: bitsandbytes 0.50.2 (CPU) golden vectors -------------------------------------------

def test_nf4_matches_bitsandbytes():
    z = np.load(GOLDEN / "bnb_nf4.npz")
    W = torch.from_numpy(z["W"])
    assert np.array_equal(dynamic_code().numpy(), z["dynamic_code"])
    for bs in (64, 128):
        plain = NF4Format(group_size=bs)
        p = plain.pack(plain.encode(W))
        assert np.array_equal(p["weight"].numpy(), z[f"bs{bs}/weight"])
        assert np.array_equal(p["absmax"].numpy(), z[f"bs{bs}/absmax"])
        dq = NF4Format(group_size=bs, double_quant=True)
        p = dq.pack(dq.encode(W))
        assert np.array_equal(p["weight"].numpy(), z[f"bs{bs}/weight"])
        assert np.array_equal(p["absmax"].numpy(), z[f"bs{bs}/dq_absmax"])
        assert np.array_equal(p["nested_absmax"].numpy(), z[f"bs{bs}/dq_nested_absmax"])
        assert np.array_equal(p["nested_offset"].numpy(), z[f"bs{bs}/dq_offset"])
        assert np.array_equal(dq.unpack(p).dequantize().numpy(), z[f"bs{bs}/dq_dequant"])


# -- FP8 / NVFP4 / MXFP4 against compressed-tensors --------------------------------------------

@pytest.mark.parametrize("strategy", ["channel", "tensor", "group"])
def test_fp8_matches_compressed_tensors(strategy):
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    W = _weights(3, 16, 256, "specials")
    args = QuantizationArgs(num_bits=8, type="float", strategy=strategy, symmetric=True,
                            group_size=32 if strategy == "group" else None)
    if strategy == "channel":
        lo, hi, fmt = W.amin(1, keepdim=True), W.amax(1, keepdim=True), FP8E4M3Format(group_size=0)
    elif strategy == "tensor":
        lo, hi, fmt = W.amin(), W.amax(), FP8E4M3Format(per_tensor=True)
    else:
        G = W.reshape(16, -1, 32)
        lo, hi, fmt = G.amin(-1), G.amax(-1), FP8E4M3Format(group_size=32)
    scale, zp = calculate_qparams(lo, hi, args)
    qt = fmt.encode(W)
    assert torch.equal(fake_quantize(W, scale, zp, args), qt.dequantize())
    packed = fmt.pack(qt)
    assert packed["weight"].dtype == torch.float8_e4m3fn
    assert torch.equal(packed["weight_scale"].reshape(-1), scale.float().reshape(-1))


def test_fp8_e5m2_is_torch_cast():
    W = _weights(4, 8, 256, "gauss")
    qt = FP8E5M2Format(group_size=0).encode(W)
    s = W.abs().amax(1, keepdim=True) / 57344.0
    assert torch.equal(qt.dequantize(), (W / s).to(torch.float8_e5m2).float() * s)


def test_nvfp4_matches_compressed_tensors():
    from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize, quantize
    from compressed_tensors.quantization.quant_scheme import NVFP4A16
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam

    args = NVFP4A16["weights"]
    for seed, kind in [(0, "gauss"), (1, "specials"), (2, "heavy")]:
        W = _weights(seed, 16, 256, kind)
        W[3, 17] = -1e-9  # rounds to −0
        gs = generate_gparam(W.amin(), W.amax())
        G = W.reshape(16, -1, 16)
        scale, zp = calculate_qparams(G.amin(-1), G.amax(-1), args, global_scale=gs)
        fmt = NVFP4Format()
        qt = fmt.encode(W)
        assert torch.equal(qt.dequantize(), fake_quantize(W, scale, zp, args, global_scale=gs))
        packed = fmt.pack(qt)
        assert torch.equal(packed["weight_global_scale"], gs)
        assert torch.equal(packed["weight_scale"].float(), scale.float())
        assert torch.equal(packed["weight_packed"], pack_fp4_to_uint8(quantize(W, scale, zp, args, global_scale=gs)))


def test_nvfp4_global_scale_for_column_slices():
    W = _weights(5, 8, 256, "gauss")
    fmt = NVFP4Format()
    with pytest.raises(LowbitError, match="global scale"):  # GPTQ-style per-slice fits without binding
        parts = [fmt.fit(W[:, i:i + 16]) for i in range(0, 256, 16)]
        scale = torch.cat([p.scale for p in parts], 1)
        zero = torch.cat([p.zero for p in parts], 1)
        from lowbit.formats import QParams
        fmt.pack(QuantizedTensor(fmt.quantize(W, QParams(scale, zero)), QParams(scale, zero), fmt))
    bound = fmt.for_tensor(W)
    parts = [bound.fit(W[:, i:i + 16]) for i in range(0, 256, 16)]
    whole = fmt.fit(W)
    assert torch.equal(torch.cat([p.scale for p in parts], 1), whole.scale)
    assert torch.equal(torch.cat([p.zero for p in parts], 1), whole.zero)


def test_fp8_per_tensor_for_column_slices():
    W = _weights(6, 8, 256, "gauss")
    bound = FP8E4M3Format(per_tensor=True).for_tensor(W)
    assert torch.equal(bound.fit(W[:, :64]).scale, torch.full((8, 1), float(W.abs().amax() / 448)))


def test_e2m1_rounding_matches_compressed_tensors_and_the_spec():
    from compressed_tensors.quantization.utils.fp4_utils import cast_to_fp4

    grid = E2M1_VALUES.tolist()
    mids = [(a + b) / 2 for a, b in zip(grid, grid[1:])]
    y = torch.tensor([v for m in mids for v in (m, np.nextafter(m, 0), np.nextafter(m, 10))] + [0.0, -0.0, 7.0, 1e9],
                     dtype=torch.float32)
    y = torch.cat([y, -y, torch.randn(10000) * 3])
    codes = e2m1_codes(y)
    assert torch.equal(e2m1_values(codes), cast_to_fp4(y.clone()))
    for v, c in zip(y.tolist(), codes.tolist()):  # nearest, ties to even code, saturating at 6
        a = min(abs(v), 6.0)
        best = min(range(8), key=lambda i: (abs(grid[i] - a), i % 2))
        assert c & 7 == best and (c >> 3) == (math.copysign(1, v) < 0)


def test_mxfp4_scale_rule_and_layout():
    from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8

    W = _weights(7, 8, 256, "specials")
    W[4, :32] = torch.tensor([2.0 ** k for k in range(-16, 16)])  # amax exactly a power of two
    W[5, 32:64] = 6.0 * 2.0 ** -130                                # subnormal block: scale clamps to 2^-127
    fmt = MXFP4Format()
    qt = fmt.encode(W)
    for r in range(W.shape[0]):
        for b in range(W.shape[1] // 32):
            amax = float(W[r, 32 * b:32 * b + 32].abs().max())
            e = math.frexp(amax)[1] - 1 - 2 if amax > 0 else -127
            assert float(qt.qparams.scale[r, b]) == 2.0 ** max(-127, min(127, e))
    packed = fmt.pack(qt)
    assert torch.equal(packed["weight_packed"], pack_fp4_to_uint8(e2m1_values(qt.W_q)))
    assert packed["weight_scale"].dtype == torch.uint8
    assert torch.equal(packed["weight_scale"].long() - 127, torch.frexp(qt.qparams.scale)[1].long() - 1)


def test_block_formats_refuse_rows_they_cannot_hold():
    with pytest.raises(GGUFShapeError, match="q5_0"):
        GGUF_FORMATS["gguf:q4_k"]().encode(torch.randn(4, 576))
    with pytest.raises(GGUFShapeError, match="q8_0"):
        GGUF_FORMATS["gguf:q6_k"]().fit(torch.randn(4, 896))
    with pytest.raises(LowbitError):
        MXFP4Format().encode(torch.randn(4, 48))
