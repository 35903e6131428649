"""Helpers shared by the bench scripts: run lowbit in a subprocess, collect its figures, print tables."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child_env() -> dict[str, str]:
    """This environment without bench/ on PYTHONPATH: bench scripts (once bench/gguf.py) must never shadow
    packages of the same name in the processes they start."""
    here = Path(__file__).resolve().parent
    env = dict(os.environ)
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != here]
    env["PYTHONPATH"] = os.pathsep.join(parts)
    return env


def run_quantize(model: Path, out: Path, *args: str) -> dict:
    """Quantize in a fresh process (so peak RSS is this run's alone); returns lowbit.json + wall time."""
    t = time.perf_counter()
    cmd = [sys.executable, "-m", "lowbit", "-q", "quantize", "--model-path", str(model), "--output-dir", str(out),
           "--overwrite", *args]
    subprocess.run(cmd, check=True, env=child_env())
    meta = json.loads((out / "lowbit.json").read_text())
    meta["wall_s"] = time.perf_counter() - t
    return meta


# Linux starts a child's ru_maxrss from its parent's peak at exec, so a bench process that itself held
# gigabytes (memory.py generates the checkpoint) would lend them to every child it measures. A small
# launcher process in between has a small peak to pass on.
_LAUNCHER = """import json, os, subprocess, sys
p = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(p.pid, 0)
with open(sys.argv[1], "w") as f:
    json.dump({"rc": os.waitstatus_to_exitcode(status), "peak_rss": usage.ru_maxrss * 1024}, f)
"""


def run_measured(cmd: list[str], cwd: Path | None = None) -> dict:
    """Run `cmd` to completion; its exit status, wall time and peak RSS (its own ru_maxrss, from wait4 in
    a small launcher, so neither this process nor earlier children count)."""
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        record = Path(tmp) / "usage.json"
        launcher = subprocess.run([sys.executable, "-c", _LAUNCHER, str(record), *cmd], cwd=cwd, env=child_env())
        if not record.is_file():
            return {"rc": launcher.returncode or 1, "wall_s": time.perf_counter() - t, "peak_rss": 0}
        usage = json.loads(record.read_text())
    return {**usage, "wall_s": time.perf_counter() - t}


def run_eval(model: Path, base: Path, text: str, n_windows: int) -> dict:
    cmd = [sys.executable, "-m", "lowbit", "-q", "eval", "--model-path", str(model), "--base", str(base),
           "--text", text, "--n-windows", str(n_windows), "--json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=child_env()).stdout
    return json.loads(out[out.index("{"):])["results"][0]


def table(rows: list[dict], cols: list[tuple[str, str]]) -> str:
    cells = [[fmt.format(r[k]) if r.get(k) is not None else "-" for k, fmt in cols] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, (k, _) in enumerate(cols)]
    line = lambda vals: "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(vals, widths)))
    head = line([k for k, _ in cols])
    return "\n".join([head, "-" * len(head), *map(line, cells)])


# -- quality tables: lowbit methods and peers on the same calibration tokens --------------------
PEERS_ROOT = Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit")) / "peers"
PEER_SCRIPTS = Path(__file__).parent / "peers"

# row name -> (venv under PEERS_ROOT, runner script in bench/peers, extra runner args)
PEERS = {
    "gptqmodel": ("gptqmodel", "gptqmodel_run.py", ()),
    "gptqmodel-desc-act": ("gptqmodel", "gptqmodel_run.py", ("--desc-act", "1")),
    "llmc-gptq": ("llmc", "llmcompressor_run.py", ("--method", "gptq")),
    "llmc-awq": ("llmc", "llmcompressor_run.py", ("--method", "awq")),
    "auto-round": ("autoround", "autoround_run.py", ()),
    "hqq": ("hqq", "hqq_run.py", ()),
    "bnb-nf4": ("bnb", "bnb_run.py", ()),
}


def save_calibration(base: Path, n: int, seq_len: int, seed: int, path: Path) -> Path:
    """The token ids lowbit's own pipeline calibrates on (default text), for peers to use verbatim."""
    import torch
    from transformers import AutoTokenizer

    from lowbit.data import calibration_ids, load_text
    ids = calibration_ids(AutoTokenizer.from_pretrained(base), load_text("default"), n, seq_len, seed)
    torch.save(ids, path)
    return path


def run_entry(entry: str, base: Path, out: Path, calib: Path, group_size: int, n_calib: int,
              reuse: bool) -> dict:
    """Quantize `base` with one table row: a lowbit method ("gptq", "gptq --act-order") or a peer
    (a key of PEERS). Runs in a fresh process; returns wall time and peak RSS (kept in out/bench.json
    so --reuse can score an output again without re-running it)."""
    record = out / "bench.json"
    if reuse and record.is_file():
        return json.loads(record.read_text())
    name, *extra = entry.split()
    if name in PEERS:
        venv, script, peer_args = PEERS[name]
        python = PEERS_ROOT / venv / "bin" / "python"
        if not python.is_file():
            raise SystemExit(f"peer {name!r} is not installed; run: bash bench/peers/setup.sh {venv}")
        cmd = [str(python), str(PEER_SCRIPTS / script), "--model", str(base), "--calib", str(calib), "--out", str(out),
               "--bits", "4", "--group-size", str(group_size), *peer_args, *extra]
    else:
        cmd = [sys.executable, "-m", "lowbit", "-q", "quantize", "--model-path", str(base), "--output-dir", str(out),
               "--overwrite", "--method", name, "--bits", "4", "--group-size", str(group_size),
               "--n-calib", str(n_calib), *extra]
    r = run_measured(cmd)
    if r["rc"] != 0:  # one failing quantizer must not cost the others' results
        print(f"FAILED ({r['rc']}): {' '.join(cmd)}", file=sys.stderr)
        return {**r, "failed": True}
    record.write_text(json.dumps(r))
    return r


def entry_dir(root: Path, model: str, group_size: int, entry: str) -> Path:
    """Where one table row's output lives (stable, so --reuse finds it again)."""
    return root / f"{model}-g{group_size}-{entry.replace(' --', '-').replace(' ', '-').replace(':', '-').lstrip('-')}"


def score(outs: list[Path], base: Path, n_windows: int) -> list[dict]:
    """Every output scored in one `lowbit eval` against the base (its logits computed once) on
    held-out Moby Dick: KLD mean with its bootstrap CI, p99, top-1, perplexity."""
    cmd = [sys.executable, "-m", "lowbit", "-q", "eval", "--model-path", *map(str, outs), "--base", str(base),
           "--text", "moby-dick", "--n-windows", str(n_windows), "--json"]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, env=child_env()).stdout)["results"]


def quality_table(model: str, group_size: int, entries: list[str], n_calib: int, n_windows: int,
                  keep: Path | None, reuse: bool) -> str:
    """Quantize `model` with every entry (same calibration ids), score all in one `lowbit eval` on
    held-out Moby Dick, and return the table (KLD also as a ratio to the first entry)."""
    import tempfile

    import lowbit
    base = lowbit.fetch(model, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        root = keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        calib = save_calibration(base, n_calib, 512, 0, root / f"{model}-calib-{n_calib}.pt")
        outs = [entry_dir(root, model, group_size, e) for e in entries]
        runs = [run_entry(e, base, o, calib, group_size, n_calib, reuse) for e, o in zip(entries, outs)]
        done = [(e, r, o) for e, r, o in zip(entries, runs, outs) if not r.get("failed")]
        entries, runs, outs = (list(x) for x in zip(*done))
        res = score(outs, base, n_windows)
    ref = res[0]["kld_mean"]
    rows = [{"method": e, "wall_s": r["wall_s"], "peak_rss_gib": r["peak_rss"] / 2**30, "kld_mean": s["kld_mean"],
             "kld_ci": f"[{s.get('kld_mean_ci_lo', float('nan')):.4f}, {s.get('kld_mean_ci_hi', float('nan')):.4f}]",
             "kld_ratio": s["kld_mean"] / ref, "kld_p99": s["kld_p99"], "top1": s["top1"], "ppl": s["ppl"],
             "ppl_base": s["ppl_base"]} for e, r, s in zip(entries, runs, res)]
    head = (f"model: {model}  W4 asym g{group_size}  calibration: {n_calib} x 512 tokens (SOTU, seed 0; the same ids "
            f"for every row)  eval: Moby Dick {n_windows} x 512 (held out)  CPU: {os.cpu_count()} cores\n"
            f"kld_ratio: KLD / KLD of '{entries[0]}'; wall_s and peak_rss_gib: the whole quantize process "
            "(load, calibrate, quantize, save)\n")
    return head + table(rows, [("method", "{}"), ("wall_s", "{:.0f}"), ("peak_rss_gib", "{:.2f}"),
                               ("kld_mean", "{:.4f}"), ("kld_ci", "{}"), ("kld_ratio", "{:.2f}x"),
                               ("kld_p99", "{:.3f}"), ("top1", "{:.2%}"), ("ppl", "{:.3f}"), ("ppl_base", "{:.3f}")])


def quality_main(entries: list[str], models: tuple[str, ...] = ("smollm2-135m:64", "qwen2.5-0.5b:128")) -> None:
    """The command line of bench/awq.py, gptq.py and methods.py: one `quality_table` per model,
    printed in one run (each model's outputs under --keep/<model>...)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=list(models), metavar="NAME[:GROUP]",
                    help="models and their group sizes (default group 64)")
    ap.add_argument("--entries", nargs="+", default=entries, help="lowbit methods (with flags) or peer names")
    ap.add_argument("--n-calib", type=int, default=128)
    ap.add_argument("--n-windows", type=int, default=40)
    ap.add_argument("--keep", type=Path, default=None, help="keep the outputs here")
    ap.add_argument("--reuse", action="store_true", help="with --keep: score outputs already there again")
    args = ap.parse_args()
    for spec in args.models:
        name, _, group = spec.partition(":")
        print(quality_table(name, int(group or 64), args.entries, args.n_calib, args.n_windows, args.keep,
                            args.reuse), flush=True)
