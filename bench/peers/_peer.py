"""What every peer runner shares. Runs inside a peer's own venv, so it imports neither lowbit nor
anything the peer lacks: torch, transformers and safetensors only.

A runner reads the calibration token ids lowbit saved (the very tokens lowbit's methods use),
quantizes the base with the peer's own API, and writes the peer's result as an ordinary fp32
checkpoint of dequantized weights (W_r = what the peer's kernels would compute with), so every
output is scored by the same `lowbit eval`; `peer.json` records the peer's version and options.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from importlib.metadata import version
from pathlib import Path

import torch


def parse_args(**extra: object) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, type=Path, help="base checkpoint dir (fp32 safetensors)")
    ap.add_argument("--calib", required=True, type=Path, help="torch.save'd int64 token ids [n, seq_len]")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--sym", action="store_true")
    for flag, default in extra.items():
        ap.add_argument(flag, type=type(default), default=default)
    return ap.parse_args()


def calibration_ids(path: Path) -> torch.Tensor:
    ids = torch.load(path)
    assert ids.dim() == 2 and ids.dtype == torch.int64, f"calibration ids must be int64 [n, seq], got {ids.dtype} {tuple(ids.shape)}"
    return ids


def save_dequantized(base: Path, out: Path, weights: dict[str, torch.Tensor], info: dict) -> None:
    """Write the base with `weights` (name -> W_r [out, in]) replaced, as fp32 safetensors, atomically."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    params = dict(model.named_parameters())
    if not weights or all(torch.equal(params[n].data, W.float().to(params[n].device)) for n, W in weights.items()):
        raise SystemExit(f"{info.get('peer')}: no weight differs from the base; its output is not quantized")
    for name, W_r in weights.items():
        p = params[name]
        assert p.shape == W_r.shape, f"{name}: {tuple(W_r.shape)} != {tuple(p.shape)}"
        assert torch.isfinite(W_r).all(), f"{name}: non-finite dequantized weight"
        p.data = W_r.float().to(p.device)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for f in base.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "chat_template.jinja"):
            shutil.copy(f, tmp / f.name)
    (tmp / "peer.json").write_text(json.dumps(info, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def package_version(name: str) -> str:
    return version(name)


class Timer:
    """Quantization time proper (load and save excluded): the figure peers advertise."""

    def __enter__(self) -> "Timer":
        self.t = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.s = time.perf_counter() - self.t
