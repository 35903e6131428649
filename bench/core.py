"""bench/core.py — the core pipeline on real models: RTN W4 wall time, peak RSS and quality.

For each model: the fp32 base (its size on disk is the baseline for memory), then RTN W4 at group 64
and group 128 (where 128 divides every linear), each quantized in its own process. Quality is KLD,
top-1 and perplexity against the base on held-out Moby Dick windows (never the calibration text).

    python bench/core.py [--models smollm2-135m qwen2.5-0.5b] [--n-windows 40]
"""
from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path

from common import run_eval, run_quantize, table

import lowbit
from lowbit.model.source import model_size_bytes


def divides_all(model_dir: Path, group: int) -> bool:
    import json
    cfg = json.loads((model_dir / "config.json").read_text())
    dims = [cfg["hidden_size"], cfg["intermediate_size"],
            cfg["num_attention_heads"] * cfg.get("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])]
    return all(d % group == 0 for d in dims)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "qwen2.5-0.5b"])
    ap.add_argument("--n-windows", type=int, default=40)
    ap.add_argument("--groups", nargs="+", type=int, default=[64, 128])
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            base = lowbit.fetch(name, progress=False)
            fp32 = model_size_bytes(base)
            for g in args.groups:
                if not divides_all(base, g):
                    continue
                out = Path(tmp) / f"{name}-g{g}"
                meta = run_quantize(base, out, "--method", "rtn", "--bits", "4", "--group-size", str(g))
                ev = run_eval(out, base, "moby-dick", args.n_windows)
                rss = meta["peak_memory"]["rss_bytes"]
                rows.append({"model": name, "method": f"rtn w4 g{g}", "wall_s": meta["wall_s"],
                             "quant_s": meta["timings"]["quantize_s"], "peak_rss_gib": rss / 2**30,
                             "fp32_gib": fp32 / 2**30, "rss_vs_fp32": rss / fp32,
                             "out_mib": model_size_bytes(out) / 2**20, "ppl_base": ev["ppl_base"], "ppl": ev["ppl"],
                             "kld_mean": ev["kld_mean"], "kld_p99": ev["kld_p99"], "top1": ev["top1"],
                             "tokens": ev["tokens"]})
    print(f"machine: {platform.processor() or platform.machine()}, CPU; eval: Moby Dick, "
          f"{args.n_windows} windows x 512 tokens (held out)")
    print(table(rows, [("model", "{}"), ("method", "{}"), ("wall_s", "{:.1f}"), ("quant_s", "{:.1f}"),
                       ("peak_rss_gib", "{:.2f}"), ("fp32_gib", "{:.2f}"), ("rss_vs_fp32", "{:.2f}x"),
                       ("out_mib", "{:.0f}"), ("ppl_base", "{:.3f}"), ("ppl", "{:.3f}"),
                       ("kld_mean", "{:.4f}"), ("kld_p99", "{:.3f}"), ("top1", "{:.2%}"), ("tokens", "{}")]))


if __name__ == "__main__":
    main()
