"""bench/dev/read_floor.py — how fast can any kernel read the W4 weights of one shape? (issue 8 probe)

A Triton kernel that only streams the bytes lowbit's W4 kernel reads for (N, K) (codes + one packed
scale/zero word per group and row) and sums them, timed exactly as bench/kernel.py times the W4 kernel
(DRAM-cold weight copies, back to back in one CUDA graph), over a grid of launch shapes; beside it
cuBLAS fp16 at batch 1, same run. cuBLAS time / best read time is the largest speedup over cuBLAS
that any W4 kernel reading these bytes could show under this timing (lowbit's own kernel: bench/kernel.py).

    python bench/dev/read_floor.py [--shape 8192x8192] [--group-size 128]
"""
from __future__ import annotations

import argparse
import itertools

import torch
import triton
import triton.language as tl

import kernel as kb
from lowbit.kernels.timing import cold_copies, graph_time, l2_bytes


@triton.jit
def _read(src, out, per_prog, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    start = pid * per_prog
    acc = tl.zeros((BLOCK,), dtype=tl.int32)
    for off in range(start, tl.minimum(start + per_prog, n), BLOCK):
        idx = off + tl.arange(0, BLOCK)
        acc += tl.load(src + idx, mask=idx < n, other=0, eviction_policy="evict_first")
    tl.store(out + pid, tl.sum(acc, axis=0))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="8192x8192")
    ap.add_argument("--group-size", type=int, default=128)
    a = ap.parse_args()
    N, K = map(int, a.shape.split("x"))
    dev = torch.device("cuda")
    q_bytes = N * K // 2 + (K // a.group_size) * N * 4
    n = q_bytes // 4
    l2 = l2_bytes(dev)
    sets = [torch.randint(-2**30, 2**30, (n,), dtype=torch.int32, device=dev) for _ in range(cold_copies(q_bytes, l2))]
    copy_bw = kb.copy_bandwidth()
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    rows = []
    for progs, block, warps in itertools.product([sms, 2 * sms, 4 * sms, 8 * sms, 16 * sms], [512, 1024, 2048, 4096], [4, 8]):
        per = triton.cdiv(triton.cdiv(n, progs), block) * block
        grid = (triton.cdiv(n, per),)
        out = torch.empty(grid[0], dtype=torch.int32, device=dev)
        t = graph_time([lambda s=s: _read[grid](s, out, per, n, BLOCK=block, num_warps=warps) for s in sets])
        rows.append((t, grid[0], block, warps))
    rows.sort()
    fsets = [torch.randn(N, K, dtype=torch.float16, device=dev) for _ in range(cold_copies(N * K * 2, l2))]
    x = torch.randn(1, K, dtype=torch.float16, device=dev)
    t_cublas = graph_time([lambda w=w: torch.nn.functional.linear(x, w) for w in fsets])
    print(f"# {torch.cuda.get_device_name(dev)}, N={N} K={K} g{a.group_size}: {q_bytes / 1e6:.2f} MB of W4 bytes, "
          f"copy BW {copy_bw / 1e12:.2f} TB/s, cuBLAS fp16 batch 1 {t_cublas * 1e6:.1f} us")
    print("read_us  pct_copy  cublas/read  programs  block  warps")
    for t, progs, block, warps in rows[:10]:
        print(f"{t * 1e6:7.2f}  {100 * q_bytes / t / copy_bw:7.0f}%  {t_cublas / t:10.2f}x  {progs:8d}  {block:5d}  {warps:5d}")


if __name__ == "__main__":
    main()
