"""bench/kernel.py — the W4A16 Triton kernel against fp16 cuBLAS on one GPU, in one run.

For each weight shape (N out × K in) and batch M: time of lowbit's fused kernel (INT4, group 128,
asymmetric) and of torch's fp16 matmul (cuBLAS), and the bandwidth each achieves (weight +
activation + output bytes / time) against the device-to-device copy bandwidth measured here.

Timing: each variant is captured in a CUDA graph that runs it over R distinct weight sets
(R · bytes ≥ 4× L2, so every call reads its weights from DRAM); the graph is replayed and the
median of several timed replays is divided by R. No launch overhead, no cache hits.

    python bench/kernel.py [--out DIR] [--group-size 128] [--sym]
    python bench/kernel.py --shapes 8192x8192 --batches 1,16 --all-configs --no-save   (tuning: every candidate)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from lowbit.kernels import reference
from lowbit.kernels.layout import pack_kernel, pack_qparams
from lowbit.kernels.timing import cold_copies, graph_time, l2_bytes
from lowbit.kernels.triton_w4a16 import _sm_count, candidates, select_config, w4a16_matmul
from common import table

SHAPES = [(4096, 4096), (8192, 8192), (28672, 8192), (8192, 28672)]
BATCHES = [1, 4, 16, 64, 256]


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy, bytes read + written per second."""
    src = torch.empty(nbytes // 2, dtype=torch.float16, device="cuda").normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e-3)
    del src, dst
    return 2 * nbytes / sorted(times)[len(times) // 2]


def bench_shape(N: int, K: int, gs: int, sym: bool, l2: int, copy_bw: float, batches=BATCHES,
                all_configs: bool = False) -> list[dict]:
    dev = torch.device("cuda")
    G = K // gs
    q_bytes = N * K // 2 + G * N * 4  # codes + the packed scale/zero word the kernel reads per group and row
    qsets = []
    for _ in range(cold_copies(q_bytes, l2)):
        W_q = torch.randint(0, 16, (N, K), dtype=torch.uint8, device=dev)
        scales = (torch.rand(G, N, device=dev) * 0.02 + 1e-3).half()
        zeros = None if sym else torch.randint(0, 16, (G, N), dtype=torch.uint8, device=dev)
        qsets.append((pack_kernel(W_q), scales, zeros, pack_qparams(scales, zeros, torch.float16)))
        del W_q
    fsets = [torch.randn(N, K, device=dev, dtype=torch.float16) * 0.02 for _ in range(cold_copies(N * K * 2, l2))]
    rows = []
    for M in batches:
        x = torch.randn(M, K, device=dev, dtype=torch.float16)
        if all_configs:  # every candidate, DRAM-cold, as the table times the chosen one
            io = M * K * 2 + M * N * 2
            for c in candidates(M, N, K, _sm_count(dev)):
                t = graph_time([lambda qs=qs, c=c: w4a16_matmul(x, *qs[:3], K, config=c, qparams=qs[3]) for qs in qsets])
                print(f"  N={N} K={K} M={M} {c}: {t * 1e6:.1f} us, {100 * (q_bytes + io) / t / copy_bw:.0f}% of copy BW",
                      flush=True)
        qw, s, z, qp = qsets[0]
        y = w4a16_matmul(x, qw, s, z, K, qparams=qp)  # tunes this shape
        want = x.double() @ reference.dequantize(qw, s, z, K, torch.float64).t()
        err = ((y.double() - want).norm() / want.norm()).item()
        cfg = select_config(x, qw, s, z, K, qp)
        t_q = graph_time([lambda qs=qs: w4a16_matmul(x, *qs[:3], K, qparams=qs[3]) for qs in qsets])
        t_f = graph_time([lambda w=w: F.linear(x, w) for w in fsets])
        io = M * K * 2 + M * N * 2
        bw_q, bw_f = (q_bytes + io) / t_q, (N * K * 2 + io) / t_f
        rows.append({"N": N, "K": K, "M": M, "lowbit_us": t_q * 1e6, "cublas_us": t_f * 1e6,
                     "speedup": t_f / t_q, "lowbit_TBs": bw_q / 1e12, "lowbit_pct_copy": 100 * bw_q / copy_bw,
                     "cublas_TBs": bw_f / 1e12, "cublas_pct_copy": 100 * bw_f / copy_bw,
                     "tflops_lowbit": 2 * M * N * K / t_q / 1e12, "rel_err": err, "config": str(cfg)})
        print(f"N={N} K={K} M={M}: lowbit {t_q * 1e6:.1f} us, cuBLAS {t_f * 1e6:.1f} us, "
              f"{t_f / t_q:.2f}x, {100 * bw_q / copy_bw:.0f}% of copy BW, err {err:.1e}, {cfg}", flush=True)
    del qsets, fsets
    torch.cuda.empty_cache()
    return rows


def plot(rows: list[dict], path: Path, shapes=SHAPES) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for N, K in shapes:
        rs = [r for r in rows if (r["N"], r["K"]) == (N, K)]
        ms = [r["M"] for r in rs]
        a.plot(ms, [r["speedup"] for r in rs], "o-", label=f"{N}x{K}")
        b.plot(ms, [r["lowbit_pct_copy"] for r in rs], "o-", label=f"lowbit {N}x{K}")
        b.plot(ms, [r["cublas_pct_copy"] for r in rs], "x--", alpha=0.5, label=f"cuBLAS fp16 {N}x{K}")
    a.axhline(1, color="gray", lw=0.8)
    a.set(xscale="log", xlabel="batch M", ylabel="speed-up over fp16 cuBLAS", title="W4A16 (g128) vs fp16")
    b.set(xscale="log", xlabel="batch M", ylabel="% of measured copy bandwidth", title="achieved bandwidth")
    a.legend()
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--sym", action="store_true")
    ap.add_argument("--tag", default="h100")
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES), help="NxK,NxK,...")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--all-configs", action="store_true", help="also time every candidate configuration")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in sh.split("x")) for sh in args.shapes.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    l2 = l2_bytes(torch.device("cuda"))
    copy_bw = copy_bandwidth()
    print(f"copy bandwidth {copy_bw / 1e12:.2f} TB/s (read + write)", flush=True)
    rows = []
    for N, K in shapes:
        rows += bench_shape(N, K, args.group_size, args.sym, l2, copy_bw, batches, args.all_configs)
    head = [f"# command: python {' '.join(sys.argv)}",
            f"# GPU: {props.name}, {props.multi_processor_count} SMs, L2 {l2 >> 20} MiB; torch {torch.__version__}, "
            f"triton {triton.__version__}",
            f"# measured device-to-device copy bandwidth: {copy_bw / 1e12:.2f} TB/s (bytes read + written)",
            f"# lowbit: INT4 g{args.group_size} {'sym' if args.sym else 'asym'}, fp16 X; cuBLAS: F.linear fp16 (what nn.Linear runs). "
            "Each time: CUDA-graph replay over weight sets totalling >= 4x L2 (DRAM-cold), median of 5.",
            "# bandwidth = (weights incl. the packed scale/zero words + X + Y bytes) / time"]
    cols = [("N", "{}"), ("K", "{}"), ("M", "{}"), ("lowbit_us", "{:.1f}"), ("cublas_us", "{:.1f}"),
            ("speedup", "{:.2f}x"), ("lowbit_TBs", "{:.2f}"), ("lowbit_pct_copy", "{:.0f}%"),
            ("cublas_TBs", "{:.2f}"), ("cublas_pct_copy", "{:.0f}%"), ("tflops_lowbit", "{:.0f}"),
            ("rel_err", "{:.1e}"), ("config", "{}")]
    text = "\n".join(head) + "\n" + table(rows, cols) + "\n"
    print(text)
    if args.no_save:
        return
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"kernel_{args.tag}.txt").write_text(text)
    plot(rows, args.out / f"kernel_{args.tag}.png", shapes)


if __name__ == "__main__":
    main()
