"""Helpers shared by the bench scripts: run lowbit in a subprocess, collect its figures, print tables."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path


def run_quantize(model: Path, out: Path, *args: str) -> dict:
    """Quantize in a fresh process (so peak RSS is this run's alone); returns lowbit.json + wall time."""
    t = time.perf_counter()
    cmd = [sys.executable, "-m", "lowbit", "-q", "quantize", "--model-path", str(model), "--output-dir", str(out),
           "--overwrite", *args]
    subprocess.run(cmd, check=True)
    meta = json.loads((out / "lowbit.json").read_text())
    meta["wall_s"] = time.perf_counter() - t
    return meta


def run_eval(model: Path, base: Path, text: str, n_windows: int) -> dict:
    cmd = [sys.executable, "-m", "lowbit", "-q", "eval", "--model-path", str(model), "--base", str(base),
           "--text", text, "--n-windows", str(n_windows), "--json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out[out.index("{"):])["results"][0]


def table(rows: list[dict], cols: list[tuple[str, str]]) -> str:
    cells = [[fmt.format(r[k]) if r.get(k) is not None else "-" for k, fmt in cols] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, (k, _) in enumerate(cols)]
    line = lambda vals: "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(vals, widths)))
    head = line([k for k, _ in cols])
    return "\n".join([head, "-" * len(head), *map(line, cells)])
