"""bench/cuda_pipeline.py — prove the CUDA path: quantize + evaluate on the GPU, compare with CPU.

Builds a random-weight model from a config dir (e.g. SmolLM2's config + tokenizer; nothing to
download), quantizes it with each method on CUDA and on CPU, and evaluates the CUDA outputs on
CUDA. Prints wall times side by side and the fraction of identical codes CPU vs CUDA.

    python bench/cuda_pipeline.py --config-dir DIR [--methods rtn] [--dtype bfloat16]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import lowbit
from common import table


def build_random(config_dir: Path, out: Path, dtype: torch.dtype, num_layers: int | None) -> Path:
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(config_dir)
    if num_layers:
        config.num_hidden_layers = num_layers
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(config_dir).save_pretrained(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config-dir", type=Path, required=True)
    ap.add_argument("--methods", nargs="+", default=["rtn"])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--n-calib", type=int, default=32)
    ap.add_argument("--num-layers", type=int, default=None, help="override the config's layer count")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = build_random(args.config_dir, Path(tmp) / "base", getattr(torch, args.dtype), args.num_layers)
        for method in args.methods:
            res = {}
            for device in ("cuda", "cpu"):
                t = time.perf_counter()
                out = lowbit.quantize(base, Path(tmp) / f"{method}-{device}", method=method, group_size=args.group_size,
                                      export_format="fake", n_calib=args.n_calib, device=device, progress=False)
                res[device] = (out, time.perf_counter() - t)
            a, b = load_file(res["cuda"][0] / "model.safetensors"), load_file(res["cpu"][0] / "model.safetensors")
            same = sum(int(torch.equal(a[k], b[k])) for k in a) / len(a)
            ev = lowbit.evaluate(str(res["cuda"][0]), str(base), n_windows=8, device="cuda", progress=False).metrics
            meta = json.loads((res["cuda"][0] / "lowbit.json").read_text())
            rows.append({"method": method, "cuda_s": res["cuda"][1], "cpu_s": res["cpu"][1],
                         "speedup": res["cpu"][1] / res["cuda"][1], "identical_tensors": same,
                         "cuda_peak_gib": meta["peak_memory"].get("cuda_bytes", 0) / 2**30,
                         "kld_mean": ev["kld_mean"], "top1": ev["top1"]})
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}  model: random weights, "
          f"config {args.config_dir.name}, layers {args.num_layers or 'all'}, {args.dtype}, n_calib {args.n_calib}")
    print(table(rows, [("method", "{}"), ("cuda_s", "{:.1f}"), ("cpu_s", "{:.1f}"), ("speedup", "{:.1f}x"),
                       ("identical_tensors", "{:.1%}"), ("cuda_peak_gib", "{:.2f}"), ("kld_mean", "{:.5f}"),
                       ("top1", "{:.2%}")]))


if __name__ == "__main__":
    main()
