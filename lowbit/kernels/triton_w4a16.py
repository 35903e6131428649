"""Triton W4A16: one fused dequantize + matmul kernel pass, INT4 group-wise weights, fp16/bf16 X.

Two kernels over the K-major, span-interleaved layout of `layout` (a 128-column span is 16 rows
of int32 words; a 128-bit load holds 4 weight rows at one column, so each X value a thread loads
serves 4 rows):

- ``_gemv_kernel`` (M = 1, decoding): CUDA-core FMAs. A program owns BN rows and a contiguous
  share of the spans (split-K over a second grid axis; partial sums meet in the output through
  atomic adds), SPB spans per iteration, the next iteration's words and scale tiles loaded
  before the current ones are used. Per group it accumulates Σ f·x and Σ x and applies the
  scale once: acc += a·Σ f·x + b·Σ x (one FFMA per weight instead of two).
- ``_gemm_kernel`` (M ≥ 2): tensor cores, Y tile += X tile · W_rᵀ slice per 16 columns (an M
  tile of 16 serves 2 ≤ M ≤ 16 at the cost of the weight bytes alone); split-K and the same
  one-iteration-ahead prefetch.

Dequantization never converts int → float: the 4-bit code q is OR-ed into the top mantissa bits
of 1.0f (f = 1 + q/16; shift, then mask and OR in one LOP3 since 1.0f comes in as an argument),
and per-group constants a = 16·s, b = −(16+z)·s give (q − z)·s = f·a + b exactly (see
`reference.dequant_fma`). a and b are computed once per group and row.

Measured on an H100 (bench/results/kernel_h100.txt): the GEMV is bound by instruction issue
(~4.9 SASS instructions per weight), not by DRAM; batch 1 reaches 62–66% of copy bandwidth.

`w4a16_matmul` picks a configuration per (M bucket, N, K, group, dtype) by timing a handful of
candidates on first use (L2 flushed between repetitions); inside CUDA-graph capture it never
times and takes the first candidate when a shape was not seen before.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

log = logging.getLogger(__name__)


ONE_BITS = 0x3F800000  # 1.0f, passed at run time so that ptxas can merge mask and OR into one LOP3


@triton.jit
def _magic(p, i: tl.constexpr, one):
    """f = 1 + q/16 (float32, exact) for the code q in nibble i of every word of p (int32)."""
    if 4 * i <= 19:
        t = p << (19 - 4 * i)
    else:
        t = p >> (4 * i - 19)
    return ((t & 0x780000) | one).to(tl.float32, bitcast=True)


@triton.jit
def _dequant(p, i: tl.constexpr, a, b, one):
    """(q − z)·s = f·(16s) + (−(16+z)·s) for the code in nibble i of every word of p, as float32."""
    return _magic(p, i, one) * a + b


@triton.jit
def _coeffs(s_ptr, z_ptr, g, G, N, offs_n, n_mask, valid, SYM: tl.constexpr):
    """a = 16·s and b = −(16 + z)·s of groups g for rows offs_n: float32, shape of g ⊗ offs_n."""
    m = n_mask & (g < G) & valid
    s = tl.load(s_ptr + g * N + offs_n, mask=m, other=0.0).to(tl.float32)
    if SYM:
        z = 8.0
    else:
        z = tl.load(z_ptr + g * N + offs_n, mask=m, other=0).to(tl.float32)
    return s * 16.0, -(z + 16.0) * s


@triton.jit
def _store(o_ptrs, y, o_mask, ACC: tl.constexpr, ATOMIC: tl.constexpr):
    if ATOMIC:
        tl.atomic_add(o_ptrs, y.to(o_ptrs.dtype.element_ty), mask=o_mask, sem="relaxed")
    else:
        if ACC:
            y += tl.load(o_ptrs, mask=o_mask, other=0.0).to(tl.float32)
        tl.store(o_ptrs, y.to(o_ptrs.dtype.element_ty), mask=o_mask)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, o_ptr, N, K, G, split_k, one,
                 GS: tl.constexpr, SYM: tl.constexpr, ACC: tl.constexpr, ATOMIC: tl.constexpr,
                 BN: tl.constexpr, SPB: tl.constexpr, EVEN_K: tl.constexpr):
    """y = x · W_rᵀ for one row x. Each iteration: SPB spans of BN rows ([SPB·16, BN] words)."""
    GSP: tl.constexpr = GS if GS < 128 else 128  # columns of one group inside one span
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n_spans = tl.cdiv(K, 128)
    n_it = tl.cdiv(n_spans, SPB)
    per = tl.cdiv(n_it, split_k)
    i0 = pid_k * per
    i1 = tl.minimum(i0 + per, n_it)
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_mask = offs_n < N
    offs_s = tl.arange(0, SPB)
    offs_j = tl.arange(0, 16)
    n2, nm2, nm3 = offs_n[None, :], n_mask[None, :], n_mask[None, None, :]
    w_off = (offs_s[:, None, None] * 16 + offs_j[None, :, None]) * N + offs_n[None, None, :]  # [SPB, 16, BN]
    acc = tl.zeros((SPB, 16, BN), dtype=tl.float32)
    span = i0 * SPB + offs_s
    p_next = tl.load(w_ptr + tl.cast(i0 * (SPB * 16), tl.int64) * N + w_off,
                     mask=nm3 & (span < n_spans)[:, None, None] & (i0 < i1), other=0, eviction_policy="evict_first")
    if GS >= 128:  # one group per span: prefetch its coefficients with the words
        a_next, b_next = _coeffs(s_ptr, z_ptr, (span * 128 // GS)[:, None], G, N, n2, nm2,
                                 (span < n_spans)[:, None] & (i0 < i1), SYM)  # [SPB, BN]
    for it in range(i0, i1):
        p = p_next
        span = it * SPB + offs_s
        nspan = span + SPB
        p_next = tl.load(w_ptr + tl.cast((it + 1) * (SPB * 16), tl.int64) * N + w_off,
                         mask=nm3 & (nspan < n_spans)[:, None, None] & (it + 1 < i1), other=0,
                         eviction_policy="evict_first")
        if GS >= 128:
            a = a_next
            b = b_next
            a_next, b_next = _coeffs(s_ptr, z_ptr, (nspan * 128 // GS)[:, None], G, N, n2, nm2,
                                     (nspan < n_spans)[:, None] & (it + 1 < i1), SYM)
        # Per group: part = Σ f·x and xs = Σ x, then acc += a·part + b·xs, which is Σ (q − z)·s·x.
        # One FFMA per weight plus two per group and thread element, instead of two per weight.
        for i in tl.static_range(8):
            if GS < 128:
                if (i * 16) % GS == 0:  # a group starts at columns 16i.. of each span
                    a, b = _coeffs(s_ptr, z_ptr, (span * (128 // GS) + (i * 16) // GS)[:, None], G, N, n2, nm2,
                                   (span < n_spans)[:, None], SYM)
            f = _magic(p, i, one)  # [SPB, 16, BN]: columns 128·span + 16i + j
            k = span[:, None] * 128 + i * 16 + offs_j[None, :]  # [SPB, 16]
            if EVEN_K:
                xv = tl.load(x_ptr + k, mask=(span < n_spans)[:, None], other=0.0).to(tl.float32)
            else:
                xv = tl.load(x_ptr + k, mask=k < K, other=0.0).to(tl.float32)
            if (i * 16) % GSP == 0:
                part = f * xv[:, :, None]  # each x value serves all of the thread's rows
                xs = xv
            else:
                part += f * xv[:, :, None]
                xs += xv
            if ((i + 1) * 16) % GSP == 0:  # the group ends here
                acc += a[:, None, :] * part + b[:, None, :] * xs[:, :, None]
    y = tl.sum(tl.sum(acc, axis=0), axis=0)  # [BN]
    _store(o_ptr + offs_n, y, n_mask, ACC, ATOMIC)


@triton.jit
def _gemm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, o_ptr, M, N, K, G, split_k, stride_xm, stride_om, one,
                 GS: tl.constexpr, SYM: tl.constexpr, ACC: tl.constexpr, ATOMIC: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, EVEN_K: tl.constexpr):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BM)
    pid_m = pid % num_m  # neighbouring programs share a weight tile (L2 reuse across M tiles)
    pid_n = pid // num_m
    n_spans = tl.cdiv(K, 128)
    per = tl.cdiv(n_spans, split_k)
    t0 = pid_k * per
    t1 = tl.minimum(t0 + per, n_spans)
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_mask = offs_n < N
    offs_m = pid_m * BM + tl.arange(0, BM)
    m_mask = offs_m < M
    offs_j = tl.arange(0, 16)
    w_off = offs_j[:, None] * N + offs_n[None, :]  # [16, BN]
    x_rows = x_ptr + offs_m[:, None] * stride_xm  # [BM, 1]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    p_next = tl.load(w_ptr + tl.cast(t0 * 16, tl.int64) * N + w_off, mask=n_mask[None, :] & (t0 < t1), other=0,
                     eviction_policy="evict_first")
    if GS >= 128:
        a_next, b_next = _coeffs(s_ptr, z_ptr, t0 * 128 // GS, G, N, offs_n, n_mask, t0 < t1, SYM)
    for t in range(t0, t1):
        p = p_next
        p_next = tl.load(w_ptr + tl.cast((t + 1) * 16, tl.int64) * N + w_off, mask=n_mask[None, :] & (t + 1 < t1),
                         other=0, eviction_policy="evict_first")
        if GS >= 128:
            a = a_next
            b = b_next
            a_next, b_next = _coeffs(s_ptr, z_ptr, (t + 1) * 128 // GS, G, N, offs_n, n_mask, t + 1 < t1, SYM)
        for i in tl.static_range(8):
            if GS < 128:
                if (i * 16) % GS == 0:
                    a, b = _coeffs(s_ptr, z_ptr, (t * 128 + i * 16) // GS, G, N, offs_n, n_mask, t < t1, SYM)
            w = _dequant(p, i, a[None, :], b[None, :], one).to(x_ptr.dtype.element_ty)  # [16, BN] = W_rᵀ slice
            k = t * 128 + i * 16 + offs_j
            if EVEN_K:
                xt = tl.load(x_rows + k[None, :], mask=m_mask[:, None], other=0.0)  # [BM, 16]
            else:
                xt = tl.load(x_rows + k[None, :], mask=m_mask[:, None] & (k[None, :] < K), other=0.0)
            acc = tl.dot(xt, w, acc)
    o_ptrs = o_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    _store(o_ptrs, acc, m_mask[:, None] & n_mask[None, :], ACC, ATOMIC)


@dataclass(frozen=True)
class Config:
    """One launch shape. kind: "gemv" (CUDA cores, M = 1) or "gemm" (tensor cores, any M)."""

    kind: str
    BM: int  # gemv: 1
    BN: int
    split_k: int
    num_warps: int
    num_stages: int = 1
    SPB: int = 1  # gemv: 128-column spans per iteration

    def __str__(self) -> str:
        if self.kind == "gemv":
            return f"gemv BN={self.BN} spans={self.SPB} split={self.split_k} w={self.num_warps}"
        return f"gemm BM={self.BM} BN={self.BN} split={self.split_k} w={self.num_warps} s={self.num_stages}"


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


_SMS: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SMS[idx]


def candidates(M: int, N: int, K: int, sms: int) -> list[Config]:
    """The few configurations timed for this shape; the first is the untimed default."""
    n_spans = -(-K // 128)

    def splits(tiles: int, iters: int) -> list[int]:
        cap = max(1, iters // 2)
        a = max(1, min(cap, -(-2 * sms // tiles)))
        return sorted({a, 1, min(2 * a, cap)}, key=lambda s: (s != a, s))

    out: list[Config] = []
    if M == 1:
        for BN, spb, warps in [(128, 1, 4), (256, 1, 4), (128, 2, 4), (64, 2, 4), (256, 2, 8)]:
            out += [Config("gemv", 1, BN, s, warps, 1, spb) for s in splits(-(-N // BN), -(-n_spans // spb))]
    else:
        BM = min(128, max(16, _next_pow2(M)))
        shapes = [(64, 4, 3), (128, 4, 3), (128, 8, 3)] if BM <= 64 else [(128, 8, 3), (64, 4, 3), (128, 4, 3)]
        for BN, warps, stages in shapes:
            out += [Config("gemm", BM, BN, s, warps, stages) for s in splits(-(-M // BM) * -(-N // BN), n_spans)]
    return out


def launch(cfg: Config, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
           zeros: torch.Tensor | None, out: torch.Tensor, in_features: int, accumulate: bool) -> torch.Tensor:
    """Run one configuration: out (+)= x · W_rᵀ. Shapes: x [M, K], out [M, N], both row-major."""
    M, K = x.shape
    G, N = scales.shape
    split = min(cfg.split_k, -(-K // (128 * cfg.SPB)))
    atomic = split > 1
    if atomic and not accumulate:
        out.zero_()
    z = scales if zeros is None else zeros  # never read when symmetric
    meta = dict(GS=K // G, SYM=zeros is None, ACC=accumulate, ATOMIC=atomic, BN=cfg.BN, EVEN_K=K % 128 == 0,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.kind == "gemv":
        assert M == 1
        grid = (triton.cdiv(N, cfg.BN), split)
        _gemv_kernel[grid](x, qweight, scales, z, out, N, K, G, split, ONE_BITS, SPB=cfg.SPB, **meta)
    else:
        grid = (triton.cdiv(M, cfg.BM) * triton.cdiv(N, cfg.BN), split)
        _gemm_kernel[grid](x, qweight, scales, z, out, M, N, K, G, split, x.stride(0), out.stride(0), ONE_BITS,
                           BM=cfg.BM, **meta)
    return out


_TUNED: dict[tuple, Config] = {}
AUTOTUNE = True  # time candidates on first use of a shape; False takes the first candidate


def _bucket(M: int) -> int:
    return M if M <= 16 else min(_next_pow2(M), 4096)


def select_config(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                  in_features: int) -> Config:
    """The configuration `w4a16_matmul` uses for this call (timing the candidates once per shape)."""
    M, (G, N) = x.shape[0], scales.shape
    key = (_bucket(M), N, in_features, G, zeros is None, x.dtype, x.device)
    cfg = _TUNED.get(key)
    if cfg is not None:
        return cfg
    cands = candidates(M, N, in_features, _sm_count(x.device))
    if not AUTOTUNE or torch.cuda.is_current_stream_capturing():
        return cands[0]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    best: tuple[float, Config] | None = None
    for c in cands:
        try:
            ms = triton.testing.do_bench(lambda: launch(c, x, qweight, scales, zeros, out, in_features, False),
                                         warmup=5, rep=20, return_mode="median")
        except Exception as e:  # a candidate that does not compile on this GPU is skipped
            log.warning("w4a16 config %s failed for M=%d N=%d K=%d: %s", c, M, N, in_features, e)
            continue
        if best is None or ms < best[0]:
            best = (ms, c)
    if best is None:
        raise RuntimeError(f"no W4A16 kernel configuration ran for M={M} N={N} K={in_features}")
    _TUNED[key] = best[1]
    log.info("w4a16 M=%d N=%d K=%d: %s (%.1f us)", M, N, in_features, best[1], best[0] * 1e3)
    return best[1]


def w4a16_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 in_features: int, out: torch.Tensor | None = None, accumulate: bool = False,
                 config: Config | None = None) -> torch.Tensor:
    """Y = X · W_rᵀ (or out += X · W_rᵀ with accumulate), fused.

    Shapes: x [M, K] fp16/bf16 row-major CUDA; qweight int32 [ceil(K/128)·16, N]; scales [G, N];
    zeros uint8 [G, N] or None (symmetric); out [M, N] in x's dtype.
    """
    M, K = x.shape
    assert K == in_features and x.stride(1) == 1 and x.dtype in (torch.float16, torch.bfloat16)
    N = qweight.shape[1]
    if out is None:
        assert not accumulate
        out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    assert out.shape == (M, N) and out.stride(1) == 1 and out.dtype == x.dtype
    cfg = config or select_config(x, qweight, scales, zeros, in_features)
    return launch(cfg, x, qweight, scales, zeros, out, in_features, accumulate)
