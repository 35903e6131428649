"""bench/dev/gemv_check.py — the kernel's batch-1 GEMV configurations against float64 dequantize-then-matmul
(tests/test_kernels.py's check, restricted to them: a short GPU run). The path is on unless LOWBIT_W4_GEMV=0."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from test_kernels import _check_kernel  # noqa: E402

from lowbit.kernels.triton_w4a16 import _sm_count, candidates  # noqa: E402


def gemv_configs(N: int, K: int) -> list:
    cs = [c for c in candidates(1, N, K, _sm_count(torch.device("cuda"))) if c.BM == 1]
    assert cs, "no GEMV candidates: LOWBIT_W4_GEMV=0 is set"
    picks = [cs[0], next((c for c in cs if c.atomic), None), next((c for c in cs if c.BN == 128), None),
             next((c for c in cs if c.BN == 32), None)]
    return list(dict.fromkeys(c for c in picks if c is not None))


CASES = [  # (N, K, group, sym, dtype, accumulate, prologue)
    (1001, 384, 128, False, torch.float16, False, None),
    (1001, 960, 64, False, torch.float16, True, "norm"),
    (1001, 960, 64, False, torch.float16, True, "glu"),
    (300, 640, 32, True, torch.bfloat16, False, "norm"),
    (300, 640, 32, True, torch.bfloat16, False, "glu"),
    (777, 352, 32, True, torch.bfloat16, False, None),
    (777, 96, 32, False, torch.float16, True, None),
]

if __name__ == "__main__":
    for N, K, gs, sym, dt, acc, pro in CASES:
        cfgs = gemv_configs(N, K)
        if pro == "norm":
            cfgs = [c for c in cfgs if not c.atomic]
        _check_kernel(1, N, K, gs, sym, dt, configs=cfgs, accumulate=acc, pro=pro)
        print(f"ok N={N} K={K} g{gs} sym={sym} {dt} acc={acc} pro={pro}: {', '.join(map(str, cfgs))}", flush=True)
