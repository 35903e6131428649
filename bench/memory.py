"""bench/memory.py — quantize a model larger than RAM: a random-weight Llama-3-8B-shaped checkpoint
(about 16 GB of bf16 safetensors) on a CPU machine, and the peak RSS that takes.

1. Builds the checkpoint under ~/.cache/lowbit/bench/ once (reused while its config matches), one shard
   at a time: no more than one ~2 GiB shard is ever in memory. Weights are N(0, 0.02²) from a seed per
   tensor name, norms are ones; the tokenizer is SmolLM2's (its 49152 ids all lie inside the
   128256-row embedding).
2. Measures the fp32 full-load peak that a non-streaming tool pays (`from_pretrained(dtype=float32)`)
   on a variant with the same shapes and only 2 decoder layers (it fits in RAM), and computes it for
   the 32-layer model from the parameter count (4 bytes × params; the 2-layer row shows how close the
   formula is).
3. Runs `lowbit quantize` in fresh processes: RTN W4 g128 on every layer, and AWQ W4 g128 on layers
   0-1 only (`--layers 0-1`; the other layers are copied unquantized). Peak RSS is the child's own
   ru_maxrss (os.wait4), so nothing else on the machine counts.

    python bench/memory.py [--runs fullload rtn awq] [--n-calib 16] [--out bench/results/memory_cpu.txt]

AWQ calibrates on --n-calib windows of 512 tokens (16 by default = the 8192 tokens its α search uses
anyway): on 2 CPU cores one pass of 128×512 tokens through one 8B layer takes minutes.
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
import zlib
from pathlib import Path

from common import run_measured, table

import torch

ROOT = Path(__file__).resolve().parents[1]  # subprocesses run here: bench/*.py would shadow packages (gguf)
CACHE = Path(os.environ.get("LOWBIT_BENCH_CACHE", Path.home() / ".cache" / "lowbit" / "bench"))
TOKENIZER = Path.home() / ".cache" / "lowbit" / "models" / "smollm2-135m"
SHARD_BYTES = 2 * 1024**3

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5,
                 rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def llama_config(**overrides):
    from transformers import LlamaConfig
    cfg = LlamaConfig(**{**LLAMA3_8B, **overrides})
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.dtype = "bfloat16"
    return cfg


def tensor_shapes(cfg) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every weight of a Llama checkpoint, in file order."""
    h, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    out = [("model.embed_tokens.weight", (v, h))]
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)), (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def random_tensor(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    if len(shape) == 1:  # norms
        return torch.ones(shape, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)


def build_checkpoint(cfg, out: Path, tokenizer: Path = TOKENIZER) -> Path:
    """Write a random bf16 checkpoint of `cfg` shard by shard (cached: rebuilt only if the config differs)."""
    from safetensors.torch import save_file
    stamp = out / "complete.json"
    want = cfg.to_json_string()
    if stamp.is_file() and stamp.read_text() == want:
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    shapes = tensor_shapes(cfg)
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        nbytes = 2 * torch.Size(shape).numel()
        if groups[-1] and size + nbytes > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += nbytes
    weight_map, total = {}, 0
    for k, group in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {name: random_tensor(name, shape) for name, shape in group}
        save_file(shard, out / fname, metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in shard.values())
        weight_map.update({name: fname for name in shard})
        del shard
        print(f"  wrote {fname}", flush=True)
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    cfg.save_pretrained(out)
    for f in tokenizer.iterdir():
        if f.name.startswith("tokenizer") or f.name.endswith(".jinja"):
            shutil.copy2(f, out / f.name)
    stamp.write_text(want)
    return out


def n_params(cfg) -> int:
    return sum(torch.Size(s).numel() for _, s in tensor_shapes(cfg))


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.glob("*.safetensors"))


FULL_LOAD = ("import sys, torch; from transformers import AutoModelForCausalLM; "
             "AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", nargs="+", default=["fullload", "rtn", "awq"], choices=["fullload", "rtn", "awq"])
    ap.add_argument("--n-calib", type=int, default=16)
    ap.add_argument("--n-grid", type=int, default=20, help="AWQ's α grid (time only: memory does not depend on it)")
    ap.add_argument("--layers", type=int, default=32, help="decoder layers of the big model (32 = Llama-3-8B)")
    ap.add_argument("--keep-outputs", action="store_true")
    ap.add_argument("--delete-model", action="store_true", help="remove the ~16 GB checkpoint afterwards")
    ap.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = ap.parse_args()

    big_cfg = llama_config(num_hidden_layers=args.layers)
    small_cfg = llama_config(num_hidden_layers=2)
    big = build_checkpoint(big_cfg, CACHE / f"llama3-8b-shape-{args.layers}l")
    rows = []
    if "fullload" in args.runs:
        small = build_checkpoint(small_cfg, CACHE / "llama3-8b-shape-2l")
        r = run_measured([sys.executable, "-c", FULL_LOAD, str(small)], cwd=ROOT)
        p = n_params(small_cfg)
        rows.append({"run": "transformers fp32 full load", "model": "8B-shape, 2 layers", "params_b": p / 1e9,
                     "source_gib": dir_bytes(small) / 2**30, "peak_rss_gib": r["peak_rss"] / 2**30,
                     "fp32_formula_gib": 4 * p / 2**30, "wall_s": r["wall_s"], "note": "measured"})
    p = n_params(big_cfg)
    rows.append({"run": "transformers fp32 full load", "model": f"8B-shape, {args.layers} layers", "params_b": p / 1e9,
                 "source_gib": dir_bytes(big) / 2**30, "peak_rss_gib": None, "fp32_formula_gib": 4 * p / 2**30,
                 "note": "not run: exceeds RAM; 4 B x params"})
    common = ["--bits", "4", "--group-size", "128", "--layer-batch-size", "1"]
    runs = {"rtn": ("lowbit rtn w4 g128", ["--method", "rtn"]),
            "awq": ("lowbit awq w4 g128 --layers 0-1",
                    ["--method", "awq", "--layers", "0-1", "--n-calib", str(args.n_calib),
                     "--n-grid", str(args.n_grid)])}
    commands = []
    for key in [k for k in ("rtn", "awq") if k in args.runs]:
        label, extra = runs[key]
        out = CACHE / f"out-{key}"
        cmd = [sys.executable, "-m", "lowbit", "-q", "quantize", "--model-path", str(big), "--output-dir", str(out),
               "--overwrite", *common, *extra]
        commands.append(shlex.join(["python", *cmd[1:]]))
        r = run_measured(cmd, cwd=ROOT)
        if r["rc"] != 0:
            raise SystemExit(f"{label} failed with exit status {r['rc']}")
        meta = json.loads((out / "lowbit.json").read_text())
        shards = sorted(out.glob("*.safetensors"))
        rows.append({"run": label, "model": f"8B-shape, {args.layers} layers", "params_b": p / 1e9,
                     "source_gib": dir_bytes(big) / 2**30, "peak_rss_gib": r["peak_rss"] / 2**30,
                     "fp32_formula_gib": 4 * p / 2**30, "wall_s": r["wall_s"],
                     "quant_s": meta["timings"]["quantize_s"], "export_s": meta["timings"]["export_s"],
                     "out_gib": dir_bytes(out) / 2**30, "shards": len(shards),
                     "note": f"{r['peak_rss'] / (4 * p):.1%} of fp32 full load"})
        if not args.keep_outputs:
            shutil.rmtree(out)
    text = "\n".join([
        f"# command: {shlex.join(['python', 'bench/memory.py', *sys.argv[1:]])}",
        *(f"#   runs: {c}" for c in commands),
        f"# machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, CPU only; "
        f"torch {torch.__version__}; peak RSS = the child's ru_maxrss",
        table(rows, [("run", "{}"), ("model", "{}"), ("params_b", "{:.2f}"), ("source_gib", "{:.2f}"),
                     ("peak_rss_gib", "{:.2f}"), ("fp32_formula_gib", "{:.2f}"), ("wall_s", "{:.0f}"),
                     ("quant_s", "{:.0f}"), ("export_s", "{:.0f}"), ("out_gib", "{:.2f}"), ("shards", "{}"),
                     ("note", "{}")]),
    ])
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    if args.delete_model:
        shutil.rmtree(big)


if __name__ == "__main__":
    main()
