"""Many candidates against one base: base logits rebuilt from cached hidden states, window-bootstrap CIs.

`evaluate_many` gives the figures `evaluate` gives (to float32 rounding: base logits are the output
head applied to the base's final hidden states, cached or not), plus 95% confidence intervals from
resampling windows.
"""
from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..data import eval_windows, load_text
from ..errors import LowbitError
from ..model.source import model_size_bytes, resolve_model_dir
from ..paths import cache_dir
from .bootstrap import CI_FIGURES, bootstrap_ci, window_sums
from .cache import BaseHead, cache_key, checkpoint_hash, final_hidden, open_or_build
from .evaluate import EvalResult, _refuse_calibration_overlap, load_causal_lm
from .metrics import TokenStats, summarize, token_stats

log = logging.getLogger(__name__)

# log-spaced KLD bins (nats) for the histogram kept in the JSON; the first bin catches KLD < 1e-6
KLD_BIN_EDGES = [0.0] + [10 ** (e / 4) for e in range(-24, 9)]


@torch.inference_mode()
def evaluate_many(model_paths: list[str], base_path: str, text: str = "moby-dick", ctx: int = 512,
                  n_windows: int | None = None, device: str = "cpu", batch_size: int = 2,
                  progress: bool = True, use_cache: bool = True, cache_root: Path | None = None,
                  n_bootstrap: int = 1000, seed: int = 0) -> list[EvalResult]:
    """Score every model in `model_paths` against `base_path` on the same windows of `text`.

    Each result's metrics hold `summarize`'s figures plus ``<figure>_ci_lo`` / ``<figure>_ci_hi``
    (95%, windows resampled `n_bootstrap` times) for kld_mean, top1, ppl and ppl_increase_pct.
    Base logits are read from the on-disk cache (see `cache`), computed there first if absent;
    with `use_cache` False nothing touches the disk and the base runs again beside every candidate.
    """
    from transformers import AutoTokenizer
    if not model_paths:
        raise LowbitError("no candidate models to evaluate")
    base_dir = resolve_model_dir(base_path)
    src = load_text(text, split="evaluation")
    cand_dirs = [resolve_model_dir(p) for p in model_paths]
    for d in cand_dirs:  # refuse before any expensive work
        _refuse_calibration_overlap(d, src.sha256, src.name)
    tok = AutoTokenizer.from_pretrained(base_dir)
    windows = eval_windows(tok, src, ctx, n_windows)
    n = int(windows.shape[0])

    base_logits = base_logits_source(base_path, base_dir, src, ctx, windows, device, batch_size, progress,
                                     use_cache, cache_root)

    results = []
    for path, d in zip(model_paths, cand_dirs):
        stats = _score(path, base_logits, windows, device, batch_size, progress)
        metrics = summarize(stats)
        metrics["ppl_increase_pct"] = 100.0 * (metrics["ppl"] / metrics["ppl_base"] - 1)
        if n_bootstrap > 0:
            ci = bootstrap_ci(window_sums(stats, [ctx - 1] * n), n_bootstrap, 0.95, seed)
            for k in CI_FIGURES:
                metrics[f"{k}_ci_lo"], metrics[f"{k}_ci_hi"] = ci[k]
        metrics["size_bytes"] = model_size_bytes(d)
        results.append(EvalResult(str(path), str(base_path), src.name, ctx, n, metrics, stats))
    return results


def base_logits_source(base_path: str, base_dir: Path, src, ctx: int, windows: torch.Tensor, device: str,
                       batch_size: int, progress: bool, use_cache: bool,
                       cache_root: Path | None) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """`f(start, ids)` -> the base's logits [b, ctx, V] for windows start..start+b: from the on-disk
    cache of final hidden states (built first if absent), or, without the cache, from the base
    model kept loaded."""
    n = int(windows.shape[0])
    if use_cache:
        root = Path(cache_root) if cache_root is not None else cache_dir("eval")
        root.mkdir(parents=True, exist_ok=True)
        key = cache_key(checkpoint_hash(base_dir, root / "checkpoint-hashes.json"), src.sha256, ctx, windows)

        def base_model():  # called only when the base is not on disk yet
            _check_disk(root, n * ctx * _hidden_size(base_dir) * 4)
            return load_causal_lm(str(base_path), device)[0]

        bar = lambda it: tqdm(it, desc="base", unit="batch", disable=not progress)  # noqa: E731
        meta = {"base": str(base_path), "base_dir": str(base_dir), "text": src.name, "text_sha256": src.sha256}
        cache, hit = open_or_build(root, key, windows, base_model, batch_size, meta, bar, device)
        log.info("base hidden states %s %s (%.1f MiB)", "reused from" if hit else "written to", cache.dir,
                 cache.nbytes / 2**20)
        return lambda start, ids: cache.logits_batch(range(start, start + ids.shape[0]), device)
    # no disk: the base stays loaded and runs again beside every candidate
    base, _ = load_causal_lm(str(base_path), device)
    head = BaseHead.of(base)
    return lambda start, ids: head(final_hidden(base, ids, check=start == 0))


def _hidden_size(model_dir: Path) -> int:
    from transformers import AutoConfig
    return int(AutoConfig.from_pretrained(model_dir).get_text_config().hidden_size)


def _check_disk(root: Path, need: int) -> None:
    free = shutil.disk_usage(root).free
    if free < need * 1.05 + 2**30:
        raise LowbitError(f"the base hidden states need {need / 2**30:.1f} GiB in {root} but only {free / 2**30:.1f} GiB "
                          "are free; use --no-cache (no disk, the base runs beside each candidate), fewer "
                          "--n-windows, or point LOWBIT_CACHE at a larger disk")
    log.info("caching %.2f GiB of base hidden states in %s", need / 2**30, root)


def _score(path: str, base_logits: Callable[[int, torch.Tensor], torch.Tensor], windows: torch.Tensor,
           device: str, batch_size: int, progress: bool) -> TokenStats:
    """Per-token stats of candidate `path`; `base_logits(start, ids)` gives the base's [b, ctx, V]."""
    model, _ = load_causal_lm(str(path), device)
    parts = []
    for start in tqdm(range(0, windows.shape[0], batch_size), desc=Path(str(path)).name, unit="batch",
                      disable=not progress):
        ids = windows[start:start + batch_size].to(device)
        lc = model(input_ids=ids).logits.float()
        lb = base_logits(start, ids)
        if lb.shape != lc.shape:
            raise LowbitError(f"{path} has vocabulary {lc.shape[-1]}, the base {lb.shape[-1]}; "
                              "a candidate must share the base's tokenizer")
        for b in range(ids.shape[0]):
            parts.append(token_stats(lb[b, :-1], lc[b, :-1], ids[b, 1:]))
    del model
    return TokenStats.concat(parts)


# -- presentation -------------------------------------------------------------------------------
def kld_histogram(kld: torch.Tensor) -> dict:
    """Counts of per-token KLD in KLD_BIN_EDGES (last bin open-ended)."""
    edges = torch.tensor(KLD_BIN_EDGES[1:], dtype=torch.float64)
    counts = torch.bincount(torch.bucketize(kld.double(), edges, right=True), minlength=len(KLD_BIN_EDGES))
    return {"edges": KLD_BIN_EDGES, "counts": [int(c) for c in counts]}


def result_json(r: EvalResult) -> dict:
    """One candidate for `--json`: the scalar figures plus a KLD histogram and per-window means."""
    out = r.to_json()
    if r.stats is not None:
        out["kld_histogram"] = kld_histogram(r.stats.kld)
        per = r.stats.kld.double().split(r.window_tokens or (r.ctx - 1))
        out["window_kld_mean"] = [float(p.mean()) for p in per]
    return out


def results_json(results: list[EvalResult]) -> dict:
    """Every candidate under "results". With a single candidate its figures are also repeated at
    the top level, the shape `lowbit eval --json` had before it took several models."""
    first = results[0]
    rows = [result_json(r) for r in results]
    head = {"base": first.base, "text": first.text, "ctx": first.ctx, "windows": first.windows,
            "tokens": first.metrics["tokens"]}
    return {**(rows[0] if len(rows) == 1 else {}), **head, "results": rows}


def format_many(results: list[EvalResult], title: str | None = None) -> str:
    """Plain-text table with 95% intervals where they were computed."""
    def ci(r, k, fmt):
        v = fmt.format(r.metrics[k])
        lo, hi = r.metrics.get(f"{k}_ci_lo"), r.metrics.get(f"{k}_ci_hi")
        return v if lo is None else f"{v} [{fmt.format(lo)}, {fmt.format(hi)}]"

    cols = [("model", lambda r: r.model), ("size", lambda r: _mib(r.metrics.get("size_bytes"))),
            ("ppl_base", lambda r: f"{r.metrics['ppl_base']:.3f}"), ("ppl", lambda r: ci(r, "ppl", "{:.3f}")),
            ("kld_mean", lambda r: ci(r, "kld_mean", "{:.5f}")), ("kld_p99", lambda r: f"{r.metrics['kld_p99']:.4f}"),
            ("top1", lambda r: ci(r, "top1", "{:.4f}")), ("rms_delta_p", lambda r: f"{r.metrics['rms_delta_p']:.4f}")]
    rows = [[f(r) for _, f in cols] for r in results]
    widths = [max(len(k), *(len(row[i]) for row in rows)) for i, (k, _) in enumerate(cols)]

    def line(vals):
        return "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(vals, widths)))
    head = line([k for k, _ in cols])
    r0 = results[0]
    if title is None:
        title = (f"base: {r0.base}  text: {r0.text}  ({r0.windows} windows × {r0.ctx - 1} scored tokens = "
                 f"{r0.metrics['tokens']}; [95% CI, windows resampled])")
    return "\n".join([title, head, "-" * len(head), *map(line, rows)])


def _mib(b) -> str:
    return "-" if b is None or (isinstance(b, float) and math.isnan(b)) else f"{b / 2**20:.1f}MiB"
