"""bench/multigpu.py — quantize one model on 1 and on N processes (torchrun; NCCL on GPUs, gloo on
CPUs): wall time, speedup, memory per rank, and whether the outputs match the 1-process run.

    # the measurement the issue asks for, on a machine with 2 GPUs (random Llama-3-8B-shaped model):
    python bench/multigpu.py --nproc 1 2 --methods gptq awq --out bench/results/multigpu_h200x2.txt
    # the same script on CPU with a small config (what CI-sized machines can run):
    python bench/multigpu.py --device cpu --small --nproc 1 2 --methods rtn awq gptq

The model is built from a config with random weights (bench/memory.py's builder: one shard in memory
at a time) under ~/.cache/lowbit/bench/ and reused. Its tokenizer is SmolLM2's when
~/.cache/lowbit/models/smollm2-135m exists, else a small BPE trained here on lowbit's embedded text
(a GPU machine that cannot download still runs this). --num-layers trims the 32 layers of the
8B shape to fit a time budget; per-layer work, hence the speedup, is the same.

Timing: `quantize_s` is the layer loop (calibration forward passes, statistics, solves); `wall_s`
adds process start, model reading, calibration embedding and export (rank 0 alone). On CPU every
process runs one thread (OMP_NUM_THREADS=1), so 1 process uses one core and 2 use two.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from common import child_env, table
from memory import CACHE, TOKENIZER, build_checkpoint, llama_config

SMALL = dict(hidden_size=512, intermediate_size=1792, num_attention_heads=8, num_key_value_heads=2,
             vocab_size=49152, num_hidden_layers=4)  # SmolLM2's tokenizer ids fit


def ensure_tokenizer() -> Path:
    """SmolLM2's tokenizer if fetched, else a 4096-token BPE trained on the embedded calibration text."""
    if (TOKENIZER / "tokenizer.json").is_file():
        return TOKENIZER
    out = CACHE / "bpe-4096"
    if (out / "tokenizer.json").is_file():
        return out
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lowbit.data import load_text
    text = load_text("default").text[:1_000_000]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4096, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text[i:i + 4000] for i in range(0, len(text), 4000)], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(out)
    return out


def run(nproc: int, model: Path, out: Path, device: str, args: list[str]) -> dict:
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), env.get("PYTHONPATH")]))
    if device == "cpu":
        env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "lowbit", "-q", "quantize", "--model-path", str(model), "--output-dir", str(out), "--overwrite",
           "--device", device, *args]
    t = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, cwd=Path(__file__).resolve().parents[1])  # not bench/: gguf.py there
    meta = json.loads((out / "lowbit.json").read_text())
    meta["wall_s"] = time.perf_counter() - t
    meta["command"] = shlex.join(["torchrun", *cmd[3:]])
    return meta


def compare(a: Path, b: Path) -> str:
    """'bitwise' when every tensor matches; else, over tensors, the largest share of integer elements
    (packed codes) that differ and the largest relative difference of float elements (grids)."""
    ta, tb = ({k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(f).items()} for d in (a, b))
    if ta.keys() != tb.keys():
        return "different tensors"
    codes = floats = 0.0
    for k in ta:
        x, y = ta[k], tb[k]
        if x.is_floating_point():
            floats = max(floats, float(((x.double() - y.double()).abs() / x.double().abs().clamp(min=1e-30)).max()))
        else:
            codes = max(codes, float((x != y).float().mean()))
    return "bitwise" if codes == floats == 0 else f"codes {codes:.3%} differ, floats rel {floats:.1e}"


def solver_loss(meta: dict) -> float | None:
    """Σ over linears of GPTQ's ||ΔW X||² / n (lowbit.json layer stats); None for other methods."""
    losses = [sum(v["loss"].values()) for v in meta["layer_stats"].values() if isinstance(v.get("loss"), dict)]
    return sum(losses) if losses else None


def memory_per_rank(meta: dict) -> str:
    ranks = meta.get("peak_memory_per_rank") or [meta["peak_memory"]]
    key = "cuda_bytes" if "cuda_bytes" in ranks[0] else "rss_bytes"
    return "/".join(f"{r[key] / 2**30:.1f}" for r in ranks) + (" GPU" if key == "cuda_bytes" else " RSS")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--small", action="store_true", help="a small Llama config instead of the 8B shape")
    ap.add_argument("--num-layers", type=int, default=None)
    ap.add_argument("--nproc", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--methods", nargs="+", default=["gptq", "awq"])
    ap.add_argument("--n-calib", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--extra", default="", help="more quantize flags, e.g. '--group-size 64'")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the quantized outputs")
    args = ap.parse_args()
    if args.nproc[0] != 1:
        args.nproc.insert(0, 1)  # the reference every other count is compared with

    overrides = dict(SMALL) if args.small else {}
    if args.num_layers:
        overrides["num_hidden_layers"] = args.num_layers
    cfg = llama_config(**overrides)
    tok = ensure_tokenizer()
    name = "small" if args.small else "llama3-8b-shape"
    model = build_checkpoint(cfg, CACHE / f"{name}-{cfg.num_hidden_layers}l", tokenizer=tok)
    rows, commands = [], []
    for method in args.methods:
        ref = None
        for n in args.nproc:
            out = CACHE / "multigpu" / f"{method}-{n}"
            flags = ["--method", method, "--n-calib", str(args.n_calib), "--seq-len", str(args.seq_len),
                     *shlex.split(args.extra)]
            meta = run(n, model, out, args.device, flags)
            commands.append(meta["command"])
            row = {"method": method, "procs": n, "wall_s": meta["wall_s"],
                   "quantize_s": meta["timings"]["quantize_s"], "memory_gib": memory_per_rank(meta),
                   "loss": solver_loss(meta)}
            if ref is None:
                ref = (out, row)
            else:
                row["speedup"] = ref[1]["quantize_s"] / row["quantize_s"]
                row["wall_speedup"] = ref[1]["wall_s"] / row["wall_s"]
                row["vs_1_proc"] = compare(ref[0], out)
                if row["loss"] is not None:
                    row["loss_vs_1"] = row["loss"] / ref[1]["loss"] - 1
            rows.append(row)
            print("row:", json.dumps(row), flush=True)
    what = (f"{'small' if args.small else 'Llama-3-8B-shaped'} random bf16 model, {cfg.num_hidden_layers} layers, "
            f"hidden {cfg.hidden_size}, {args.n_calib}x{args.seq_len} calibration tokens")
    device = (torch.cuda.get_device_name(0) + f" x{torch.cuda.device_count()}") if args.device == "cuda" \
        else f"CPU {platform.machine()}, {os.cpu_count()} cores, 1 thread per process (gloo)"
    text = "\n".join([
        f"# command: {shlex.join(['python', 'bench/multigpu.py', *sys.argv[1:]])}",
        *(f"#   {c}" for c in commands),
        f"# {device}; torch {torch.__version__}; {what}",
        "# speedup = quantize_s(1 process) / quantize_s(N); memory = peak per rank (GPU: max allocated)",
        "# GPTQ: loss = Σ ||ΔW X||²/n over linears; its error feedback turns a rounding flip from float noise into"
        " a different (equally good) row, so codes differ while the loss agrees (1 vs 2 threads in one process"
        " differ as much)",
        table(rows, [("method", "{}"), ("procs", "{}"), ("wall_s", "{:.1f}"), ("quantize_s", "{:.1f}"),
                     ("speedup", "{:.2f}x"), ("wall_speedup", "{:.2f}x"), ("memory_gib", "{}"),
                     ("vs_1_proc", "{}"), ("loss", "{:.4f}"), ("loss_vs_1", "{:+.2%}")]),
    ])
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    if not args.keep:
        shutil.rmtree(CACHE / "multigpu", ignore_errors=True)


if __name__ == "__main__":
    main()
