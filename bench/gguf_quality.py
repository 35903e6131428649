"""bench/gguf_quality.py — lowbit's GGUF files beside llama-quantize's, scored by llama.cpp itself (issue 5).

For each model: an F32 GGUF (`lowbit export gguf --type F32`) is the reference; llama-perplexity
writes its logits on held-out Moby Dick (--kl-divergence-base) and scores every other file against
them (--kl-divergence, same ctx and chunks for all). Rows:

  llama-quantize  Q4_0, Q4_K_M, Q4_K_M + imatrix (llama-imatrix on lowbit's calibration text), Q6_K
  lowbit plain    `lowbit export gguf --type T` (llama.cpp's encoders, same bytes as llama-quantize)
  lowbit calib.   `lowbit quantize --method M --weight-format gguf:T --format gguf` (AWQ scales folded or
                  GPTQ error feedback on each tensor's own grid, calibration E[x²] as the imatrix)

Then the Q4_0 vs Q4_X fidelity table: a symmetric INT4 group-32 checkpoint (`lowbit quantize --sym
--group-size 32`) exported as Q4_0 blocks directly (Q4_X) beside plain Q4_0 re-quantization of its
weights, cosine and max-abs error against the INT4 weights (worst tensor).

    python bench/gguf_quality.py --models smollm2-135m [qwen2.5-0.5b] [--calibrated awq:Q4_K_M gptq:Q4_K_M] \
        [--keep DIR [--reuse]]

Run it under `flock /tmp/lowbit-heavy.lock` on a shared machine. (Named gguf_quality, not gguf: a
bench/gguf.py would shadow the `gguf` package for every bench script run with bench/ on the path.)
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]  # this file's name hides the package
import gguf  # noqa: E402

sys.path.append(str(_HERE))
from common import table  # noqa: E402

LLAMA_TYPES = ["Q4_0", "Q4_K_M", "Q4_K_M+imatrix", "Q6_K"]
PLAIN_TYPES = ["Q4_0", "Q4_K_M", "Q6_K"]
CALIBRATED = ["awq:Q4_K_M", "gptq:Q4_K_M", "awq+gptq:Q4_K_M"]


def lowbit(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "lowbit", "-q", *args], check=True)


def tool(bin_dir: Path, name: str, *args: str) -> str:
    r = subprocess.run([str(bin_dir / name), *args], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{name} failed:\n{r.stderr[-3000:]}")
    return r.stdout + r.stderr


def weights_bits(path: Path) -> tuple[int, float]:
    """(file bytes, bits per weight over all tensors' data)."""
    tensors = gguf.GGUFReader(str(path)).tensors
    n = sum(int(t.n_elements) for t in tensors)
    return path.stat().st_size, 8 * sum(int(t.n_bytes) for t in tensors) / n


def parse_kld(out: str) -> dict:
    def num(pattern: str) -> float | None:
        m = re.search(pattern, out)
        return float(m.group(1)) if m else None
    return {"kld_mean": num(r"Mean\s+KLD:\s+([-\d.eE+]+)"), "kld_p99": num(r"99\.0%\s+KLD:\s+([-\d.eE+]+)"),
            "same_top_p": num(r"Same top p:\s+([\d.]+)"), "ppl": num(r"Mean PPL\(Q\)\s*:\s+([\d.]+)")}


def bench_model(name: str, args, bin_dir: Path, work: Path) -> str:
    from lowbit.data import load_text
    from lowbit.export.gguf import export_gguf
    from lowbit.zoo import fetch

    model = fetch(name, progress=False)
    work.mkdir(parents=True, exist_ok=True)
    moby, calib = work / "moby.txt", work / "calib.txt"
    moby.write_text(load_text("moby-dick").text)
    calib.write_text(load_text("default", split="calibration").text)
    kld_args = ["-c", str(args.ctx), "--chunks", str(args.chunks), "-t", str(args.threads), "-b", str(args.ctx)]
    f32, base = work / "F32.gguf", work / "base.kld"
    timings: dict[str, float] = {}

    def timed(key: str, fn) -> None:
        t = time.perf_counter()
        fn()
        timings[key] = time.perf_counter() - t

    if not (args.reuse and base.is_file()):
        export_gguf(str(model), str(f32), "F32", overwrite=True)
        timed("kld_base", lambda: tool(bin_dir, "llama-perplexity", "-m", str(f32), "-f", str(moby), *kld_args,
                                       "--kl-divergence-base", str(base)))
    files: list[tuple[str, str, Path]] = []  # (who, type, file)
    imatrix = work / "imatrix.gguf"
    for t in LLAMA_TYPES:
        out = work / f"llama-{t}.gguf"
        if not (args.reuse and out.is_file()):
            extra = []
            if t.endswith("+imatrix"):
                if not imatrix.is_file():
                    timed("llama-imatrix", lambda: tool(
                        bin_dir, "llama-imatrix", "-m", str(f32), "-f", str(calib), "-o", str(imatrix),
                        "-c", "512", "--chunks", str(args.n_calib), "-t", str(args.threads)))
                extra = ["--imatrix", str(imatrix)]
            timed(f"llama-quantize {t}", lambda: tool(bin_dir, "llama-quantize", *extra, str(f32), str(out),
                                                      t.split("+")[0], str(args.threads)))
        files.append(("llama-quantize", t, out))
    for t in PLAIN_TYPES:
        out = work / f"lowbit-{t}.gguf"
        if not (args.reuse and out.is_file()):
            timed(f"lowbit export {t}", lambda: lowbit("export", "gguf", "--model-path", str(model), "--type", t,
                                                       "--output", str(out), "--overwrite"))
        files.append(("lowbit plain", t, out))
    for entry in args.calibrated:
        method, t = entry.split(":")
        out_dir = work / f"lowbit-{method}-{t}"
        if not (args.reuse and (out_dir / "model.gguf").is_file()):
            # --reuse also continues a killed run of this entry rather than starting it over
            unfinished = args.reuse and out_dir.with_name(out_dir.name + ".partial").is_dir()
            timed(f"lowbit {method} {t}", lambda: lowbit(
                "quantize", "--model-path", str(model), "--output-dir", str(out_dir),
                "--resume" if unfinished else "--overwrite",
                "--method", method, "--weight-format", f"gguf:{t}", "--format", "gguf",
                "--n-calib", str(args.n_calib)))
        files.append((f"lowbit {method}", t, out_dir / "model.gguf"))

    rows = []
    for who, t, path in files:
        score = work / f"{path.parent.name if path.name == 'model.gguf' else path.stem}.score.json"
        if args.reuse and score.is_file():
            kld = json.loads(score.read_text())
        else:
            kld = parse_kld(tool(bin_dir, "llama-perplexity", "-m", str(path), "-f", str(moby), *kld_args,
                                 "--kl-divergence-base", str(base), "--kl-divergence"))
            score.write_text(json.dumps(kld))
        size, bpw = weights_bits(path)
        rows.append({"who": who, "type": t, "MiB": size / 2**20, "bytes": size, "bpw": bpw, **kld})
    ref = next((r for r in rows if r["who"] == "llama-quantize" and r["type"] == "Q4_K_M+imatrix"), None)
    for r in rows:
        r["vs_imatrix"] = r["kld_mean"] / ref["kld_mean"] if ref and r["kld_mean"] and ref["kld_mean"] else None
    lines = [f"model: {name}  KLD vs its F32 GGUF, llama-perplexity on Moby Dick, ctx {args.ctx} x {args.chunks} "
             f"chunks (second half of each chunk scored); calibration: {args.n_calib} x 512 tokens of lowbit's "
             "default text (SOTU) for llama-imatrix and lowbit",
             table(rows, [("who", "{}"), ("type", "{}"), ("bytes", "{:d}"), ("MiB", "{:.1f}"), ("bpw", "{:.3f}"),
                          ("kld_mean", "{:.5f}"), ("kld_p99", "{:.4f}"), ("same_top_p", "{:.2f}%"),
                          ("ppl", "{:.3f}"), ("vs_imatrix", "{:.2f}x")])]
    goal = [r for r in rows if r["who"].startswith("lowbit ") and r["who"] != "lowbit plain" and r["type"] == "Q4_K_M"]
    for r in goal:
        same = ref is not None and r["bytes"] <= ref["bytes"] * 1.001
        met = same and r["vs_imatrix"] is not None and r["vs_imatrix"] <= 0.8
        lines.append(f"goal ({r['who']} Q4_K_M KLD <= 0.8x llama-quantize Q4_K_M+imatrix at equal size): "
                     f"{r['vs_imatrix']:.2f}x, size {r['bytes']} vs {ref['bytes'] if ref else '-'} bytes -> "
                     f"{'MET' if met else 'NOT MET'}")
    lines.append(q4x_table(model, work, args.reuse))
    lines.append("timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    return "\n".join(lines)


def bf16_copy(model: Path, out: Path) -> Path:
    """The model saved in bfloat16 (as released; lowbit's cached copy may be float32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if not (out / "config.json").is_file():
        AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).save_pretrained(out)
        AutoTokenizer.from_pretrained(model).save_pretrained(out)
    return out


def q4x_table(model: Path, work: Path, reuse: bool) -> str:
    """Q4_0 vs Q4_X from a symmetric INT4 group-32 checkpoint (seed 003) with bf16 group scales, as
    INT4 QAT releases ship them (lowbit stores scales in the source dtype: a bf16 copy of the model)."""
    from lowbit.export.gguf import export_gguf
    ckpt = work / "int4-sym-g32-bf16"
    if not (reuse and (ckpt / "lowbit.json").is_file()):
        lowbit("quantize", "--model-path", str(bf16_copy(model, work / "bf16")), "--output-dir", str(ckpt),
               "--overwrite", "--method", "rtn", "--sym", "--group-size", "32", "--bits", "4")
    report = export_gguf(str(ckpt), str(work / "int4-Q4_X.gguf"), "Q4_0", overwrite=True)
    worst = report.fidelity_summary()
    rows = [{"encoding": "Q4_0 (re-quantized)", "cosine": worst["q4_0"].cosine, "max_abs": worst["q4_0"].max_abs_err,
             "rel_amax": 100 * worst["q4_0"].rel_max_abs_err},
            {"encoding": "Q4_X (INT4 codes as Q4_0)", "cosine": worst["q4_x"].cosine,
             "max_abs": worst["q4_x"].max_abs_err, "rel_amax": 100 * worst["q4_x"].rel_max_abs_err}]
    return (f"Q4_0 vs Q4_X against the INT4 sym g32 checkpoint, bf16 scales ({len(report.fidelity)} linears, "
            "worst tensor):\n"
            + table(rows, [("encoding", "{}"), ("cosine", "{:.9f}"), ("max_abs", "{:.3g}"), ("rel_amax", "{:.4f}%")]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["smollm2-135m"])
    ap.add_argument("--calibrated", nargs="*", default=CALIBRATED, help="method:PRESET entries for lowbit quantize")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--n-calib", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep", type=Path, default=None, help="work directory to keep (default: a temporary one)")
    ap.add_argument("--reuse", action="store_true",
                    help="with --keep: reuse files and scores already there, continue unfinished lowbit runs")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from lowbit.tools.llamacpp import ensure_llama_cpp
    bins = ensure_llama_cpp()
    root = args.keep or Path(tempfile.mkdtemp(prefix="lowbit-gguf-bench-"))
    for name in args.models:
        print(bench_model(name, args, bins, root / name), flush=True)
        print(flush=True)


if __name__ == "__main__":
    main()
