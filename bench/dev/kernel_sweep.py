"""bench/dev/kernel_sweep.py — time a wide grid of W4 kernel configurations for one shape (tuning aid).

Every configuration is timed DRAM-cold the way bench/kernel.py times the chosen one (CUDA graph over
weight sets >= 4x L2), with the early PDL trigger off and on; prints the best ones of each.

    python bench/dev/kernel_sweep.py --shape 8192x8192 --batch 1 [--gemv] [--top 20]
"""
from __future__ import annotations

import argparse
import itertools

import torch

import kernel as kb
from lowbit.kernels.timing import cold_copies, graph_time, l2_bytes
from lowbit.kernels import triton_w4a16 as tw
from lowbit.kernels.layout import pack_kernel, pack_qparams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="8192x8192")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--bn", default="32,64,128,256")
    ap.add_argument("--splits", default="1,2,3,4,6,8")
    ap.add_argument("--warps", default="2,4,8")
    ap.add_argument("--stages", default="3,4,6,8")
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--gemv", action="store_true", help="batch 1: the GEMV path (BM=1) instead of the dot path")
    ap.add_argument("--atomic", default="0,1", help="split-K epilogue: partials (0) and/or atomic adds (1)")
    ap.add_argument("--triggers", default="0,1", help="early PDL trigger off (0) and/or on (1)")
    a = ap.parse_args()
    N, K = map(int, a.shape.split("x"))
    M, dev, gs = a.batch, torch.device("cuda"), 128
    l2 = l2_bytes(torch.device("cuda"))
    copy_bw = kb.copy_bandwidth()
    G = K // gs
    q_bytes = N * K // 2 + G * N * 4
    sets = []
    for _ in range(cold_copies(q_bytes, l2)):
        W_q = torch.randint(0, 16, (N, K), dtype=torch.uint8, device=dev)
        s = (torch.rand(G, N, device=dev) * 0.02 + 1e-3).half()
        z = torch.randint(0, 16, (G, N), dtype=torch.uint8, device=dev)
        sets.append((pack_kernel(W_q), s, z, pack_qparams(s, z, torch.float16)))
    x = torch.randn(M, K, device=dev, dtype=torch.float16)
    BM = 1 if a.gemv else min(128, max(16, tw._next_pow2(M)))
    ints = lambda t: [int(v) for v in t.split(",")]
    cfgs = [tw.Config(BM, bn, sp, w, st, at) for bn, sp, w, st, at in
            itertools.product(ints(a.bn), ints(a.splits), ints(a.warps), ints(a.stages), [bool(v) for v in ints(a.atomic)])
            if not (at and sp == 1) and not (bn >= 256 and w == 2)]
    io = M * K * 2 + M * N * 2
    print(f"# {torch.cuda.get_device_name()}, N={N} K={K} M={M}, copy BW {copy_bw / 1e12:.2f} TB/s, {len(cfgs)} configs", flush=True)
    for trig in (bool(int(v)) for v in a.triggers.split(",")):
        tw.TRIGGER = trig
        res = []
        for c in cfgs:
            try:
                t = graph_time([lambda qs=qs, c=c: tw.w4a16_matmul(x, *qs[:3], K, config=c, qparams=qs[3]) for qs in sets],
                                  min_s=0.02)
            except Exception as e:  # out of shared memory or registers: not a candidate
                print(f"  {c}: {type(e).__name__}", flush=True)
                continue
            res.append((t, c))
        res.sort(key=lambda r: r[0])
        print(f"## trigger {'on' if trig else 'off'}: best {a.top}")
        for t, c in res[:a.top]:
            print(f"  {t * 1e6:6.2f} us  {100 * (q_bytes + io) / t / copy_bw:4.0f}%  {c}", flush=True)


if __name__ == "__main__":
    main()
