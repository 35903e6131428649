"""Compare a quantized model with its base on held-out text, window by window."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..data import eval_windows, load_text
from ..errors import LowbitError
from ..model.source import resolve_model_dir
from .metrics import TokenStats, summarize, token_stats

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
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
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


@torch.inference_mode()
def evaluate(model_path: str, base_path: str, text: str = "moby-dick", ctx: int = 512,
             n_windows: int | None = None, device: str = "cpu", batch_size: int = 2,
             progress: bool = True) -> EvalResult:
    """KLD(base ‖ model), perplexity of both, top-1 agreement on non-overlapping windows of `text`."""
    from transformers import AutoTokenizer
    model, model_dir = load_causal_lm(model_path, device)
    base, base_dir = load_causal_lm(base_path, device)
    src = load_text(text, split="evaluation")
    _refuse_calibration_overlap(model_dir, src.sha256, src.name)
    tok = AutoTokenizer.from_pretrained(base_dir)
    windows = eval_windows(tok, src, ctx, n_windows)
    parts = []
    for batch in tqdm(windows.split(batch_size), desc="eval", unit="batch", disable=not progress):
        batch = batch.to(device)
        lb = base(input_ids=batch).logits.float()
        lc = model(input_ids=batch).logits.float()
        for b in range(batch.shape[0]):
            parts.append(token_stats(lb[b, :-1], lc[b, :-1], batch[b, 1:]))
    stats = TokenStats.concat(parts)
    return EvalResult(str(model_path), str(base_path), src.name, ctx, int(windows.shape[0]), summarize(stats), stats)


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
