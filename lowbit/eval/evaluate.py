"""Compare a quantized model with its base on held-out text, window by window."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import LowbitError
from ..model.source import resolve_model_dir
from .metrics import TokenStats

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    model: str
    base: str
    text: str
    ctx: int
    windows: int
    metrics: dict[str, float]
    stats: TokenStats | None = field(default=None, repr=False)
    window_tokens: list[int] | None = field(default=None, repr=False)  # scored tokens per window when they vary

    def to_json(self) -> dict:
        return {"model": self.model, "base": self.base, "text": self.text, "ctx": self.ctx,
                "windows": self.windows, **self.metrics}


def load_causal_lm(path: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """Any checkpoint lowbit reads or writes (plain, compressed-tensors, .gguf, hub id), in eval mode."""
    from transformers import AutoModelForCausalLM
    from ..model.compat import packed_zero_point_on_meta
    model_dir = resolve_model_dir(path)
    try:
        with packed_zero_point_on_meta():
            # use_kernels=False: transformers would otherwise swap layers for hub kernels on CUDA
            # (a download, and other numerics for the base than for what we compare it with)
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, use_kernels=False)
    except Exception as e:
        raise LowbitError(f"transformers could not load {model_dir} ({type(e).__name__}: {e})") from e
    return model.to(device).eval(), model_dir


def _refuse_calibration_overlap(model_dir: Path, text_sha: str, text_name: str) -> None:
    meta = model_dir / "lowbit.json"
    if meta.is_file():
        calib = json.loads(meta.read_text()).get("calibration", {})
        if calib.get("sha256") == text_sha:
            raise LowbitError(f"evaluation text {text_name} is the text {model_dir.name} was calibrated on; "
                              "evaluate on held-out text (e.g. --text moby-dick)")


def evaluate(model_path: str, base_path: str, text: str = "moby-dick", ctx: int = 512,
             n_windows: int | None = None, device: str = "cpu", batch_size: int = 2,
             progress: bool = True, n_bootstrap: int = 1000) -> EvalResult:
    """KLD(base ‖ model), perplexity of both, top-1 agreement on non-overlapping windows of `text`.

    One candidate, nothing kept on disk: `compare.evaluate_many` with ``use_cache=False`` (the one
    place metrics are computed).
    """
    from .compare import evaluate_many
    return evaluate_many([model_path], base_path, text=text, ctx=ctx, n_windows=n_windows, device=device,
                         batch_size=batch_size, progress=progress, use_cache=False, n_bootstrap=n_bootstrap)[0]


def format_table(results: list[EvalResult]) -> str:
    """A plain-text table, one row per evaluated model."""
    cols = [("model", "{}"), ("ppl_base", "{:.3f}"), ("ppl", "{:.3f}"), ("kld_mean", "{:.5f}"),
            ("kld_p99", "{:.4f}"), ("kld_max", "{:.3f}"), ("top1", "{:.2%}"), ("same_top_p", "{:.2%}"),
            ("rms_delta_p", "{:.4f}")]
    rows = [[fmt.format(r.model if k == "model" else r.metrics[k]) for k, fmt in cols] for r in results]
    widths = [max(len(k), *(len(row[i]) for row in rows)) for i, (k, _) in enumerate(cols)]
    line = lambda vals: "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(vals, widths)))
    head = line([k for k, _ in cols])
    text = results[0].text if results else ""
    tokens = results[0].metrics["tokens"] if results else 0
    return "\n".join([f"text: {text}  ({tokens} scored tokens)", head, "-" * len(head), *map(line, rows)])
