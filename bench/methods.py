"""bench/methods.py — lowbit's methods side by side on one real model, same calibration, same eval.

Every method quantizes with the same calibration tokens (embedded SOTU text, --n-calib × 512,
seed 0) in its own process (wall time, peak RSS); all outputs are then scored in one
`lowbit eval` against the base on held-out Moby Dick windows. KLD is also given as a ratio to RTN.

    python bench/methods.py --model smollm2-135m --group-size 64 --methods rtn awq dh-awq awq-joint gptq
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import run_quantize, table

import lowbit


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--methods", nargs="+", default=["rtn", "awq", "dh-awq", "awq-joint", "gptq", "awq+gptq"])
    ap.add_argument("--n-calib", type=int, default=128)
    ap.add_argument("--n-windows", type=int, default=40)
    ap.add_argument("--keep", type=Path, default=None, help="keep the outputs here")
    ap.add_argument("--reuse", action="store_true",
                    help="with --keep: score outputs already there (their lowbit.json gives time and memory)")
    args = ap.parse_args()
    base = lowbit.fetch(args.model, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        metas, outs = {}, []
        for m in args.methods:
            out = root / f"{args.model}-{m}-g{args.group_size}"
            outs.append(out)
            if args.reuse and (out / "lowbit.json").is_file():
                metas[m] = json.loads((out / "lowbit.json").read_text())
                metas[m]["wall_s"] = metas[m]["timings"]["total_s"]
                continue
            metas[m] = run_quantize(base, out, "--method", m, "--bits", "4", "--group-size", str(args.group_size),
                                    "--n-calib", str(args.n_calib))
        cmd = [sys.executable, "-m", "lowbit", "-q", "eval", "--model-path", *map(str, outs), "--base", str(base),
               "--text", "moby-dick", "--n-windows", str(args.n_windows), "--json"]
        res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)["results"]
    rtn_kld = next((r["kld_mean"] for m, r in zip(args.methods, res) if m == "rtn"), None)
    rows = []
    for m, r in zip(args.methods, res):
        rows.append({"method": m, "wall_s": metas[m]["wall_s"], "peak_rss_gib": metas[m]["peak_memory"]["rss_bytes"] / 2**30,
                     "kld_mean": r["kld_mean"], "kld_ci": f"[{r.get('kld_mean_ci_lo', float('nan')):.4f}, "
                                                          f"{r.get('kld_mean_ci_hi', float('nan')):.4f}]",
                     "kld_vs_rtn": r["kld_mean"] / rtn_kld if rtn_kld else None, "kld_p99": r["kld_p99"],
                     "top1": r["top1"], "ppl": r["ppl"], "ppl_base": r["ppl_base"]})
    print(f"model: {args.model}  W4 asym g{args.group_size}  calibration: {args.n_calib} x 512 tokens (SOTU, seed 0)  "
          f"eval: Moby Dick {args.n_windows} x 512 (held out)  CPU: {__import__('os').cpu_count()} cores")
    print(table(rows, [("method", "{}"), ("wall_s", "{:.0f}"), ("peak_rss_gib", "{:.2f}"), ("kld_mean", "{:.4f}"),
                       ("kld_ci", "{}"), ("kld_vs_rtn", "{:.2f}x"), ("kld_p99", "{:.3f}"), ("top1", "{:.2%}"),
                       ("ppl", "{:.3f}"), ("ppl_base", "{:.3f}")]))


if __name__ == "__main__":
    main()
