"""Serving figures on the machine at hand: prefill and decode tokens/s, per-token latency, peak memory.

Each model runs through the path lowbit offers for its format:

* a 4-bit compressed-tensors pack-quantized checkpoint: `lowbit.load` (QuantLinear: the Triton
  W4A16 kernel on CUDA, dequantize-on-the-fly on CPU), decode through `lowbit.runtime.Decoder`
  (static KV cache, CUDA graph) on CUDA for the families it supports;
* anything else (the float base, fake-quant, other formats): transformers, via `load_causal_lm`.

Batch 1. Prefill: one forward over a `prompt_tokens` prompt (random token ids, seeded), the median
of `repeats` runs. Decode: `new_tokens` greedy steps with the KV cache after that prefill, each
step timed alone (synchronized on CUDA); decode tokens/s = 1 / mean step time, p50/p95 over all
steps of all repeats. Peak memory: on CUDA the allocator's peak (`max_memory_allocated`) once
warmed up (weights, KV cache and activations; the scratch buffers of one-off kernel tuning are not
serving memory); on CPU the process's peak RSS, which is why every model is measured in a fresh
process (``isolate``; torch and Python themselves are part of that figure, ~0.3-0.5 GiB).
`weights_bytes` is what the loaded model's parameters and buffers hold.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import LowbitError
from ..model.compat import cached_forward
from ..model.source import resolve_model_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServingConfig:
    prompt_tokens: int = 128
    new_tokens: int = 64
    repeats: int = 3
    device: str = "cpu"
    dtype: str = "auto"     # activation dtype: auto (fp32 on CPU, fp16 on CUDA), fp32, fp16, bf16
    engine: str = "auto"    # auto, transformers, decoder
    seed: int = 0


@dataclass
class ServingFigures:
    model: str
    runtime: str
    device: str
    dtype: str
    prompt_tokens: int
    new_tokens: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    p50_ms: float
    p95_ms: float
    memory_bytes: int
    weights_bytes: int
    threads: int

    def to_json(self) -> dict:
        d = asdict(self)
        d["tokens_per_s"] = self.decode_tokens_per_s  # what a gate's --min-tokens-per-s judges
        d["memory_kind"] = "cuda max_memory_allocated" if self.device.startswith("cuda") else "process peak RSS"
        return d


def _percentile(xs: list[float], q: float) -> float:
    t = torch.tensor(xs, dtype=torch.float64)
    return float(torch.quantile(t, q))


def _is_lowbit_packed(model_dir: Path) -> bool:
    cfg = json.loads((model_dir / "config.json").read_text())
    qc = cfg.get("quantization_config") or {}
    return qc.get("format") == "pack-quantized"


def load_for_serving(path: str, device: str, dtype: torch.dtype) -> tuple[torch.nn.Module, str]:
    """The model on lowbit's runtime path for its format, and a name for that path."""
    model_dir = resolve_model_dir(path)
    if _is_lowbit_packed(model_dir):
        from ..runtime import load
        try:
            return load(model_dir, device=device, dtype=dtype), "lowbit.load (QuantLinear " + (
                "Triton W4A16)" if device.startswith("cuda") else "dequantize on CPU)")
        except LowbitError as e:  # e.g. 8-bit or act-order checkpoints: transformers decompresses them
            log.info("%s: %s; measuring through transformers", path, e)
    from .evaluate import load_causal_lm
    return load_causal_lm(str(path), device, dtype)[0], "transformers"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    try:
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]
    except KeyError:
        raise LowbitError(f"serving dtype {name!r}: choose auto, fp32, fp16 or bf16") from None


def _reset_peak(device: str) -> None:
    """Forget the allocator's peak so far (kernel tuning's scratch buffers, e.g. Triton's 256 MiB
    L2-flush buffer); what is still allocated (weights, caches) stays counted."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_memory(device: str) -> int:
    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    import resource
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


@torch.inference_mode()
def measure(path: str, cfg: ServingConfig) -> ServingFigures:
    """Serving figures of one model in this process (see the module docstring)."""
    dev, dtype = cfg.device, _dtype(cfg.dtype, cfg.device)
    if dev.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    model, runtime = load_for_serving(path, dev, dtype)
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    vocab = int(model.config.get_text_config().vocab_size)
    g = torch.Generator().manual_seed(cfg.seed)
    prompt = torch.randint(0, vocab, (1, cfg.prompt_tokens), generator=g).to(dev)

    def prefill():
        out = cached_forward(model, prompt)
        _sync(dev)
        return out

    out = prefill()  # warm-up (kernel selection, allocator)
    _reset_peak(dev)
    prefill_s = []
    for _ in range(cfg.repeats):
        t0 = time.perf_counter()
        out = prefill()
        prefill_s.append(time.perf_counter() - t0)

    prefill_peak = _peak_memory(dev)
    use_decoder = cfg.engine == "decoder" or (cfg.engine == "auto" and dev.startswith("cuda"))
    steps: list[float] = []
    if use_decoder:
        from ..runtime import Decoder
        try:
            dec = Decoder(model, max_len=cfg.prompt_tokens + cfg.new_tokens + 1)
        except LowbitError as e:
            if cfg.engine == "decoder":
                raise
            log.info("%s: %s; decoding through transformers", path, e)
            use_decoder = False
    if use_decoder:
        runtime += " + Decoder"
        for r in range(cfg.repeats + 1):  # the first round warms up (and captures the graph)
            dec.prefill(prompt)
            _sync(dev)
            for _ in range(cfg.new_tokens):
                t0 = time.perf_counter()
                dec.decode(1)
                _sync(dev)
                if r:
                    steps.append(time.perf_counter() - t0)
            if r == 0:
                _reset_peak(dev)
    else:
        for r in range(cfg.repeats + 1):
            logits, past = prefill()
            nxt = logits[:, -1:].argmax(-1)
            for _ in range(cfg.new_tokens):
                t0 = time.perf_counter()
                logits, past = cached_forward(model, nxt, past)
                nxt = logits[:, -1:].argmax(-1)
                _sync(dev)
                if r:
                    steps.append(time.perf_counter() - t0)
            if r == 0:
                _reset_peak(dev)
    prefill_med = sorted(prefill_s)[len(prefill_s) // 2]
    return ServingFigures(
        model=str(path), runtime=runtime, device=dev, dtype=str(dtype).removeprefix("torch."),
        prompt_tokens=cfg.prompt_tokens, new_tokens=cfg.new_tokens,
        prefill_tokens_per_s=cfg.prompt_tokens / prefill_med,
        decode_tokens_per_s=len(steps) / sum(steps),
        p50_ms=1000 * _percentile(steps, 0.5), p95_ms=1000 * _percentile(steps, 0.95),
        memory_bytes=max(prefill_peak, _peak_memory(dev)), weights_bytes=int(weights), threads=torch.get_num_threads())


def _child_main() -> None:
    """Entry point of the isolated process: a JSON request on stdin, the figures as JSON on stdout."""
    import sys
    req = json.loads(sys.stdin.read())
    figs = measure(req["path"], ServingConfig(**req["cfg"]))
    sys.stdout.write("\n" + json.dumps(asdict(figs)) + "\n")


def bench(path: str, cfg: ServingConfig = ServingConfig(), isolate: bool = True) -> ServingFigures:
    """Serving figures of one model; with `isolate`, in a fresh Python process so its peak memory
    is its own (and nothing another model left behind is counted)."""
    if cfg.repeats < 1 or cfg.new_tokens < 1 or cfg.prompt_tokens < 1:
        raise LowbitError("serving benchmark: prompt tokens, new tokens and repeats must be at least 1")
    if not isolate:
        return measure(path, cfg)
    import subprocess
    import sys
    req = json.dumps({"path": str(path), "cfg": asdict(cfg)})
    proc = subprocess.run([sys.executable, "-c", "from lowbit.eval.serving import _child_main; _child_main()"],
                          input=req, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        raise LowbitError(f"the serving benchmark of {path} failed: {tail[0]}")
    return ServingFigures(**json.loads(proc.stdout.strip().splitlines()[-1]))


def bench_many(model_paths: list[str], base_path: str | None, cfg: ServingConfig = ServingConfig(),
               isolate: bool = True) -> tuple[ServingFigures | None, list[ServingFigures]]:
    """The base (when given) and every candidate, one after another."""
    base = bench(base_path, cfg, isolate) if base_path else None
    return base, [bench(p, cfg, isolate) for p in model_paths]


def format_serving(base: ServingFigures | None, cands: list[ServingFigures]) -> str:
    rows = ([base] if base else []) + cands
    head = ["model", "runtime", "prefill tok/s", "decode tok/s", "p50 ms", "p95 ms", "peak mem", "weights"]
    from .size import format_bytes
    body = [[("base: " if base is not None and r is base else "") + r.model, r.runtime,
             f"{r.prefill_tokens_per_s:.1f}", f"{r.decode_tokens_per_s:.1f}", f"{r.p50_ms:.2f}", f"{r.p95_ms:.2f}",
             format_bytes(r.memory_bytes), format_bytes(r.weights_bytes)] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    line = lambda v: "  ".join(x.ljust(w) if i < 2 else x.rjust(w) for i, (x, w) in enumerate(zip(v, widths)))  # noqa: E731
    r0 = rows[0]
    title = (f"serving on {r0.device} ({r0.threads} threads, {r0.dtype}), batch 1: prompt {r0.prompt_tokens} tokens, "
             f"{r0.new_tokens} decode steps; peak mem = {'CUDA allocator peak' if r0.device.startswith('cuda') else 'process peak RSS'}")
    return "\n".join([title, line(head), "-" * len(line(head)), *map(line, body)])
