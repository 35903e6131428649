"""bench/leaderboard.py — every lowbit method and every peer that installs here, one table (issue 7).

SmolLM2-135M at 4 bits. Every calibrated row reads the same calibration token ids (lowbit's
default SOTU text, --n-calib x 512, seed 0); every output, GGUF files included (dequantized by
transformers' GGUF reader), is scored in one `lowbit eval` on held-out Moby Dick against the
unquantized model, so the KLD columns compare like with like.

Rows (each quantizer in its own process; peers in their own venvs, `bash bench/peers/setup.sh`):
  lowbit   rtn, awq, dh-awq, awq-joint, gptq, awq+gptq (INT4 asym g64), rtn and awq on NF4
  peers    llm-compressor AWQ and GPTQ, GPTQModel, auto-round (INT4 asym g64), HQQ (g64),
           bitsandbytes NF4 (block 64)
  GGUF     llama-quantize Q4_K_M plain and with llama-imatrix (same calibration text), lowbit's
           calibrated Q4_K_M (`lowbit quantize --method awq --weight-format gguf:Q4_K_M`)

bpw: bits per weight of the quantized linears, their scales / zeros / block metadata included, with
16-bit scales as deployed (for GGUF, of the decoder linears' tensors in the file: SmolLM2's 576-wide
rows do not divide into 256-weight K-quant blocks, so llama.cpp falls back to Q5_0 / Q8_0 there);
size_mib: the whole model as deployed, unquantized tensors in 16 bits (for GGUF, the file, which
also quantizes the embedding). wall_s / peak_rss_gib: the whole quantize process.
The plot is KLD against size with the Pareto front.

    PYTHONPATH=bench python bench/leaderboard.py [--keep DIR [--reuse]] [--entries ...] [--out bench/results]

Run it under `flock /tmp/lowbit-heavy.lock` on a shared machine (about 1.5 h on 2 cores from scratch).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from common import PEERS, entry_dir, run_entry, run_measured, save_calibration, score, table

# NF4 has no compressed-tensors layout: those rows write fake-quant checkpoints (bpw counted from the format)
LOWBIT = ["rtn", "awq", "dh-awq", "awq-joint", "gptq", "awq+gptq", "rtn --weight-format nf4 --format fake",
          "awq --weight-format nf4 --format fake"]
PEER_ROWS = ["llmc-awq", "llmc-gptq", "gptqmodel", "auto-round", "hqq", "bnb-nf4"]
GGUF = ["gguf:llama:Q4_K_M", "gguf:llama-imatrix:Q4_K_M", "gguf:lowbit-awq:Q4_K_M"]
ENTRIES = LOWBIT + PEER_ROWS + GGUF

# storage of each peer's result, as a lowbit size scheme or as bits per weight
PEER_STORAGE = {"llmc-awq": "int4", "llmc-gptq": "int4", "gptqmodel": "int4", "auto-round": "int4",
                # HQQ keeps a 16-bit scale and a 16-bit zero per group; bnb a float32 absmax per block
                "hqq": 4 + 32 / 64, "bnb-nf4": 4 + 32 / 64}


def lowbit_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "lowbit", "-q", *args]


def gguf_entry(entry: str, base: Path, work: Path, calib_ids: Path, n_calib: int, reuse: bool,
               bins: Path) -> tuple[Path, dict]:
    """Make one GGUF row's file; returns it with the quantizing process's wall time and peak RSS."""
    import json

    import torch
    from transformers import AutoTokenizer

    _, who, gtype = entry.split(":")
    work.mkdir(parents=True, exist_ok=True)
    out = work / f"{who}-{gtype}.gguf"
    record = work / f"{who}-{gtype}.bench.json"
    if reuse and out.is_file() and record.is_file():
        return out, json.loads(record.read_text())
    if who.startswith("lowbit-"):
        out_dir = work / f"{who}-{gtype}"
        r = run_measured(lowbit_cmd("quantize", "--model-path", str(base), "--output-dir", str(out_dir), "--overwrite",
                                    "--method", who.removeprefix("lowbit-"), "--weight-format", f"gguf:{gtype}",
                                    "--format", "gguf", "--n-calib", str(n_calib)))
        if r["rc"] == 0:
            os.replace(out_dir / "model.gguf", out)
    else:
        f32 = work / "F32.gguf"
        if not f32.is_file():
            run_measured(lowbit_cmd("export", "gguf", "--model-path", str(base), "--type", "F32", "--output", str(f32),
                                    "--overwrite"))
        extra: list[str] = []
        if who == "llama-imatrix":
            imatrix = work / "imatrix.gguf"
            if not imatrix.is_file():
                # the calibration ids as text, so llama-imatrix sees the very tokens the other rows do
                text = work / "calib.txt"
                tok = AutoTokenizer.from_pretrained(base)
                text.write_text("".join(tok.decode(row) for row in torch.load(calib_ids)))
                run_measured([str(bins / "llama-imatrix"), "-m", str(f32), "-f", str(text), "-o", str(imatrix),
                              "-c", "512", "--chunks", str(n_calib), "-t", str(os.cpu_count())])
            extra = ["--imatrix", str(imatrix)]
        r = run_measured([str(bins / "llama-quantize"), *extra, str(f32), str(out), gtype, str(os.cpu_count())])
    if r["rc"] != 0:
        print(f"FAILED ({r['rc']}): {entry}", file=sys.stderr)
        return out, {**r, "failed": True}
    record.write_text(json.dumps(r))
    return out, r


def _sized(shape, scheme: str):
    """`lowbit size`'s figures for a scheme, as deployed: 16-bit scales and unquantized tensors."""
    import dataclasses

    import torch

    from lowbit.eval.size import parse_scheme, weight_size
    return weight_size(dataclasses.replace(shape, dtype=torch.bfloat16), parse_scheme(scheme, group_size=64),
                       keep_dtype=torch.bfloat16)


def int_size(shape, scheme: str) -> tuple[float, int]:
    """(bpw of the quantized linears, bytes of the whole model) for a lowbit storage scheme."""
    ws = _sized(shape, scheme)
    return ws.linear_bpw, ws.total_bytes


def bpw_size(shape, bpw: float) -> tuple[float, int]:
    ws = _sized(shape, "int4")
    return bpw, ws.kept_bytes + round(ws.quantized_params * bpw / 8)


def gguf_size(path: Path) -> tuple[float, int]:
    """(bpw of the decoder linears' tensors in the file, file bytes)."""
    import gguf
    lin = [t for t in gguf.GGUFReader(str(path)).tensors
           if t.name.startswith("blk.") and t.name.endswith(".weight") and len(t.shape) == 2]
    return 8 * sum(int(t.n_bytes) for t in lin) / sum(int(t.n_elements) for t in lin), path.stat().st_size


def storage(entry: str, shape, out: Path) -> tuple[float, int]:
    if entry.startswith("gguf:"):
        return gguf_size(out)
    if entry in PEER_STORAGE:
        s = PEER_STORAGE[entry]
        return int_size(shape, s) if isinstance(s, str) else bpw_size(shape, s)
    fmt = entry.split("--weight-format ")[1].split()[0] if "--weight-format" in entry else "int4"
    return int_size(shape, fmt)


def pareto(rows: list[dict]) -> set[str]:
    """Rows no other row beats on both size and KLD."""
    return {r["method"] for r in rows
            if not any(o["size_mib"] <= r["size_mib"] and o["kld_mean"] < r["kld_mean"] for o in rows if o is not r)}


def plot(rows: list[dict], front: set[str], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 6))
    for r in rows:
        mine = not (r["method"] in PEERS or r["method"].startswith("gguf:llama"))
        ax.scatter(r["size_mib"], r["kld_mean"], s=40, c="tab:blue" if mine else "tab:orange",
                   marker="o" if mine else "s", edgecolors="k" if r["method"] in front else "none")
        ax.annotate(r["method"], (r["size_mib"], r["kld_mean"]), fontsize=7, xytext=(4, 2), textcoords="offset points")
    fr = sorted((r for r in rows if r["method"] in front), key=lambda r: r["size_mib"])
    ax.plot([r["size_mib"] for r in fr], [r["kld_mean"] for r in fr], "k--", lw=0.8, label="Pareto front")
    ax.scatter([], [], c="tab:blue", label="lowbit")
    ax.scatter([], [], c="tab:orange", marker="s", label="peers")
    ax.set_yscale("log")
    ax.set_xlabel("model size as stored (MiB)")
    ax.set_ylabel("KLD to the unquantized model (mean, held-out Moby Dick)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--entries", nargs="+", default=ENTRIES)
    ap.add_argument("--n-calib", type=int, default=32)
    ap.add_argument("--n-windows", type=int, default=40)
    ap.add_argument("--keep", type=Path, default=None, help="keep the outputs here")
    ap.add_argument("--reuse", action="store_true", help="with --keep: score outputs already there again")
    ap.add_argument("--out", type=Path, default=None, help="write leaderboard_<model>.txt / .png here")
    args = ap.parse_args()

    import lowbit
    from lowbit.eval.size import model_shape
    base = lowbit.fetch(args.model, progress=False)
    shape = model_shape(str(base))
    bins = None
    if any(e.startswith("gguf:") for e in args.entries):
        from lowbit.tools.llamacpp import ensure_llama_cpp
        bins = ensure_llama_cpp()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        calib = save_calibration(base, args.n_calib, 512, 0, root / f"{args.model}-calib-{args.n_calib}.pt")
        done = []
        for e in args.entries:
            if e.startswith("gguf:"):
                out, r = gguf_entry(e, base, root / f"{args.model}-gguf", calib, args.n_calib, args.reuse, bins)
            else:
                out = entry_dir(root, args.model, 64, e)
                r = run_entry(e, base, out, calib, 64, args.n_calib, args.reuse)
            if not r.get("failed"):
                done.append((e, r, out))
            print(f"{e}: {r['wall_s']:.0f} s", flush=True)
        results = score([o for _, _, o in done], base, args.n_windows)
    rows = []
    for (e, r, out), s in zip(done, results):
        bpw, nbytes = storage(e, shape, out)
        rows.append({"method": e, "bpw": bpw, "size_mib": nbytes / 2**20, "kld_mean": s["kld_mean"],
                     "kld_ci": f"[{s['kld_mean_ci_lo']:.4f}, {s['kld_mean_ci_hi']:.4f}]", "kld_p99": s["kld_p99"],
                     "top1": s["top1"], "ppl": s["ppl"], "wall_s": r["wall_s"], "peak_rss_gib": r["peak_rss"] / 2**30})
    rows.sort(key=lambda r: r["kld_mean"])
    front = pareto(rows)
    for r in rows:
        r["pareto"] = "*" if r["method"] in front else ""
    head = (f"model: {args.model} (base ppl {results[0]['ppl_base']:.3f})  4-bit weights  calibration: {args.n_calib} "
            f"x 512 tokens (SOTU, seed 0; the same ids for every calibrated row)  eval: Moby Dick {args.n_windows} "
            f"x 512 (held out), KLD to the unquantized model  CPU: {os.cpu_count()} cores\n"
            "pareto: * = no other row is both smaller and lower in KLD\n")
    text = head + table(rows, [("method", "{}"), ("bpw", "{:.3f}"), ("size_mib", "{:.1f}"), ("kld_mean", "{:.4f}"),
                               ("kld_ci", "{}"), ("kld_p99", "{:.3f}"), ("top1", "{:.2%}"), ("ppl", "{:.3f}"),
                               ("wall_s", "{:.0f}"), ("peak_rss_gib", "{:.2f}"), ("pareto", "{}")])
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"leaderboard_{args.model}.txt").write_text(
            f"# command: PYTHONPATH=bench python bench/leaderboard.py {' '.join(sys.argv[1:])}\n" + text + "\n")
        plot(rows, front, args.out / f"leaderboard_{args.model}.png", f"{args.model}: 4-bit quantizers, KLD vs size")


if __name__ == "__main__":
    main()
