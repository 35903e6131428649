"""bench/dev/gemv_probe.py — does a dot-free GEMV inner loop stream faster at batch 1? (experiment)

Same packed layout, constants and PTX dequantization as lowbit's W4 kernel, but the K=16 slices
are multiplied by X's slices with float32 FMAs into a [16, BN] accumulator (no tl.dot, so no
join/permute/transpose of the dequantized tile), split-K partials added atomically in float32.
Prints time and % of copy bandwidth against the production kernel, DRAM-cold (bench/kernel.py).
"""
from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

import kernel as kb
from lowbit.kernels.timing import cold_copies, graph_time, l2_bytes
from lowbit.kernels import triton_w4a16 as tw
from lowbit.kernels.layout import pack_kernel, pack_qparams
from lowbit.kernels.triton_w4a16 import _A16_1, _C16_1, _consts


@triton.jit
def _gemv(x_ptr, w_ptr, q_ptr, o_ptr, N, K, G, split_k, BN: tl.constexpr, PDL: tl.constexpr, F16ACC: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n_spans = tl.cdiv(K, 128)
    per = tl.cdiv(n_spans, split_k)
    t0 = pid_k * per
    t1 = tl.minimum(t0 + per, n_spans)
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_mask = offs_n < N
    offs_j = tl.arange(0, 16)
    w_off = offs_j[:, None] + offs_n[None, :] * 16
    if PDL:
        tl.extra.cuda.gdc_wait()
    acc = tl.zeros((16, BN), dtype=tl.float32)
    for t in range(t0, t1):
        base = tl.cast(t, tl.int64) * N * 16
        p = tl.load(w_ptr + base + w_off, mask=n_mask[None, :], other=0, eviction_policy="evict_first")
        sa, ca, oa = _consts(q_ptr, t, G, N, offs_n, n_mask, tl.float16)
        w0, w1, w2, w3, w4, w5, w6, w7 = tl.inline_asm_elementwise(
            _A16_1, _C16_1, [p, sa, ca, oa], dtype=(tl.float16,) * 8, is_pure=True, pack=2)
        xb = x_ptr + t * 128 + offs_j
        x0 = tl.load(xb)[:, None]
        x1 = tl.load(xb + 16)[:, None]
        x2 = tl.load(xb + 32)[:, None]
        x3 = tl.load(xb + 48)[:, None]
        x4 = tl.load(xb + 64)[:, None]
        x5 = tl.load(xb + 80)[:, None]
        x6 = tl.load(xb + 96)[:, None]
        x7 = tl.load(xb + 112)[:, None]
        if F16ACC:  # products and their sum over the span in fp16, the running sum in fp32
            s = w0 * x0 + w1 * x1 + w2 * x2 + w3 * x3 + w4 * x4 + w5 * x5 + w6 * x6 + w7 * x7
            acc += s.to(tl.float32)
        else:
            acc += (w0.to(tl.float32) * x0.to(tl.float32) + w1.to(tl.float32) * x1.to(tl.float32)
                    + w2.to(tl.float32) * x2.to(tl.float32) + w3.to(tl.float32) * x3.to(tl.float32)
                    + w4.to(tl.float32) * x4.to(tl.float32) + w5.to(tl.float32) * x5.to(tl.float32)
                    + w6.to(tl.float32) * x6.to(tl.float32) + w7.to(tl.float32) * x7.to(tl.float32))
    y = tl.sum(acc, axis=0)
    tl.atomic_add(o_ptr + offs_n, y, mask=n_mask, sem="relaxed")


def gemv(x, qw, qp, out, K, BN, split, warps, stages, f16acc):
    N = qw.shape[1]
    out.zero_()
    _gemv[(triton.cdiv(N, BN), split)](x, qw, qp, out, N, K, K // 128, split, BN=BN, PDL=True, F16ACC=f16acc,
                                       num_warps=warps, num_stages=stages, launch_pdl=True)
    return out


def main() -> None:
    dev = torch.device("cuda")
    l2 = l2_bytes(torch.device("cuda"))
    copy_bw = kb.copy_bandwidth()
    print(f"# {torch.cuda.get_device_name()}, copy BW {copy_bw / 1e12:.2f} TB/s", flush=True)
    for N, K in ((8192, 8192), (28672, 8192)):
        G = K // 128
        q_bytes = N * K // 2 + G * N * 4
        sets = []
        for _ in range(cold_copies(q_bytes, l2)):
            W_q = torch.randint(0, 16, (N, K), dtype=torch.uint8, device=dev)
            s = (torch.rand(G, N, device=dev) * 0.02 + 1e-3).half()
            z = torch.randint(0, 16, (G, N), dtype=torch.uint8, device=dev)
            sets.append((pack_kernel(W_q), s, z, pack_qparams(s, z, torch.float16)))
        x = torch.randn(1, K, device=dev, dtype=torch.float16)
        out = torch.empty(N, device=dev, dtype=torch.float32)
        ref = tw.w4a16_matmul(x, *sets[0][:3], K, qparams=sets[0][3]).float()[0]
        t_ref = graph_time([lambda qs=qs: tw.w4a16_matmul(x, *qs[:3], K, qparams=qs[3]) for qs in sets])
        io = K * 2 + N * 2
        print(f"N={N} K={K}: production {t_ref * 1e6:.2f} us {100 * (q_bytes + io) / t_ref / copy_bw:.0f}% "
              f"({tw.select_config(x, *sets[0][:3], K, sets[0][3])})", flush=True)
        res = []
        for BN, split, warps, stages, f16 in itertools.product((64, 128, 256), (2, 4, 8), (4, 8), (3, 4, 6), (False, True)):
            try:
                y = gemv(x, sets[0][0], sets[0][3], out, K, BN, split, warps, stages, f16)
                err = ((y - ref).norm() / ref.norm()).item()
                t = graph_time([lambda qs=qs: gemv(x, qs[0], qs[3], out, K, BN, split, warps, stages, f16)
                                   for qs in sets], min_s=0.02)
            except Exception as e:
                print(f"  BN={BN} split={split} w={warps} s={stages} f16={f16}: {type(e).__name__} {e}"[:200], flush=True)
                continue
            res.append((t, BN, split, warps, stages, f16, err))
        res.sort()
        for t, BN, split, warps, stages, f16, err in res[:12]:
            print(f"  gemv {t * 1e6:6.2f} us {100 * (q_bytes + io) / t / copy_bw:4.0f}%  BN={BN} split={split} "
                  f"w={warps} s={stages} f16acc={f16} err_vs_prod={err:.1e}", flush=True)


if __name__ == "__main__":
    main()
