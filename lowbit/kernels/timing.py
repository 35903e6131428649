"""Timing GPU calls the way a decode step runs them: back to back in one CUDA graph, weights cold.

A call timed alone (events around one launch, L2 flushed before it) includes the launch gap and the
flush's tail, which hide differences of a few percent between configurations; `graph_time` measures
what a served model pays: each call reads its own weights from DRAM while the previous call's
kernel has just finished.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch


def graph_time(calls: list[Callable[[], object]], min_s: float = 0.05) -> float:
    """Seconds per call: one CUDA graph runs every call once; median of 5 timed replay batches.

    Each call runs once eagerly first (compiling kernels, allocating what must exist before capture).
    """
    for c in calls:
        c()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    g.replay()
    torch.cuda.synchronize()
    t = time.perf_counter()
    g.replay()
    torch.cuda.synchronize()
    reps = max(3, math.ceil(min_s / max(time.perf_counter() - t, 1e-6)))
    samples = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            g.replay()
        b.record()
        b.synchronize()
        samples.append(a.elapsed_time(b) * 1e-3 / (reps * len(calls)))
    del g
    return sorted(samples)[2]


def cold_copies(set_bytes: int, l2_bytes: int) -> int:
    """How many distinct weight sets a graph cycles through so that each call finds its set out of
    L2 (together at least 4x L2), 2 to 64."""
    return max(2, min(64, math.ceil(4 * l2_bytes / max(set_bytes, 1))))


def l2_bytes(device: torch.device) -> int:
    """The GPU's L2 size (50 MiB, an H100's, where torch does not report it)."""
    return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
