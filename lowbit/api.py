"""The Python API, mirroring the CLI one to one."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .spec import CalibConfig, QuantizeConfig, QuantScheme


def quantize(model_path: str, output_dir: str, method: str = "rtn", bits: int = 4, group_size: int = 128,
             sym: bool = False, fmt: str = "int", export_format: str = "compressed-tensors",
             calib_dataset: str = "default", n_calib: int = 128, seq_len: int = 512, seed: int = 0,
             device: str = "cpu", dtype: str = "auto", layer_batch_size: int = 16, lmhead_chunks: int = 4,
             quantize_lm_head: bool = False, layers: str | None = None, overwrite: bool = False,
             resume: bool = False, progress: bool = True, calib_batch_size: int = 8, dist=None,
             **method_options: Any) -> Path:
    """Quantize a model (checkpoint dir, .gguf or hub id) and write `output_dir`.

    `dist`: a lowbit.distributed.Dist when this process is one of torchrun's (the CLI makes it).

    >>> lowbit.quantize("~/.cache/lowbit/models/smollm2-135m", "out", bits=4, group_size=64)
    """
    from .pipeline import quantize as run
    cfg = QuantizeConfig(
        model_path=str(model_path), output_dir=str(output_dir), method=method,
        scheme=QuantScheme(format=fmt, bits=bits, group_size=group_size, sym=sym),
        export_format=export_format,
        calib=CalibConfig(dataset=calib_dataset, n_samples=n_calib, seq_len=seq_len, seed=seed,
                          batch_size=calib_batch_size),
        method_options=tuple(sorted(method_options.items())), device=device, dtype=dtype,
        layer_batch_size=layer_batch_size, lmhead_chunks=lmhead_chunks, quantize_lm_head=quantize_lm_head,
        layers=layers)
    return run(cfg, overwrite=overwrite, resume=resume, progress=progress, dist=dist)


def evaluate(model_path: str, base: str, text: str = "moby-dick", ctx: int = 512, n_windows: int | None = None,
             device: str = "cpu", progress: bool = True):
    """KLD / perplexity / top-1 of `model_path` against `base` on held-out `text`."""
    from .eval import evaluate as run
    return run(model_path, base, text=text, ctx=ctx, n_windows=n_windows, device=device, progress=progress)


def fetch(name: str, progress: bool = True) -> Path:
    """Fetch a known real model (e.g. 'smollm2-135m') into ~/.cache/lowbit/models."""
    from .zoo import fetch as run
    return run(name, progress=progress)
