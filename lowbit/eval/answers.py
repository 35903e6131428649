"""KLD on the base model's own answers (seed 000's measurement).

Held-out prose measures how a candidate drifts on text nobody asked it to write. What users see
is the model answering prompts, so: the base answers a set of prompts through its chat template
(greedy by default, or seeded sampling), and every candidate is scored on exactly those answer
tokens, teacher-forced: KL(base ‖ candidate) per answer token (mean, median, p99, max), top-1
agreement, and the perplexity of the answers under both models. Prompt tokens are never scored.

Prompts: the embedded set (``default``: 40 instructions written for lowbit, public domain / CC0),
a ``.jsonl`` file (one object a line with a "prompt", "instruction", "question" or "text" field)
or a ``.txt`` file (one prompt per non-empty line).

The base's answers and its final hidden states on them are kept under
``~/.cache/lowbit/eval/answers-<key>/`` (key: base content, prompt token ids, generation settings),
so a second run, or a run with other candidates, neither generates nor runs the base again.
Layout: meta.json, head.safetensors (as `cache`), answers.safetensors (``prompt.<i>``,
``answer.<i>`` int64 ids, ``hidden.<i>`` float32 [len(answer_i), hidden]).
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..errors import LowbitError
from ..model.source import model_size_bytes, resolve_model_dir
from ..paths import atomic_dir, cache_dir
from .bootstrap import CI_FIGURES, bootstrap_ci, window_sums
from .cache import BaseHead, checkpoint_hash, final_hidden
from .evaluate import EvalResult, load_causal_lm
from .metrics import TokenStats, summarize, token_stats

log = logging.getLogger(__name__)

ANSWERS_VERSION = 2
_PROMPT_FIELDS = ("prompt", "instruction", "question", "text")


@dataclass(frozen=True)
class PromptSet:
    name: str
    prompts: tuple[str, ...]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.prompts).encode()).hexdigest()


def load_prompts(source: str | None = None, n: int | None = None) -> PromptSet:
    """The embedded prompt set (None or "default") or a user's .jsonl / .txt file; the first `n`."""
    if source in (None, "default"):
        raw = resources.files("lowbit.data").joinpath("prompts.jsonl").read_text(encoding="utf-8")
        name, prompts = "default", _parse_jsonl(raw, "lowbit/data/prompts.jsonl")
    else:
        p = Path(source).expanduser()
        if not p.is_file():
            raise LowbitError(f"prompt file {source} not found; give a .jsonl (a \"prompt\" field per line) "
                              "or .txt (one prompt per line) file, or omit --prompts for the embedded set")
        try:
            raw = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise LowbitError(f"cannot read prompt file {p} ({e})") from None
        name = str(p)
        prompts = _parse_jsonl(raw, str(p)) if p.suffix == ".jsonl" else [ln.strip() for ln in raw.splitlines()
                                                                           if ln.strip()]
    if not prompts:
        raise LowbitError(f"prompt set {name} is empty")
    if n is not None:
        if n < 1:
            raise LowbitError(f"--n-prompts must be at least 1, not {n}")
        prompts = prompts[:n]
    return PromptSet(name, tuple(prompts))


def _parse_jsonl(raw: str, where: str) -> list[str]:
    out = []
    for i, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise LowbitError(f"{where}:{i} is not valid JSON") from None
        text = next((obj[f] for f in _PROMPT_FIELDS if isinstance(obj, dict) and isinstance(obj.get(f), str)), None)
        if text is None:
            raise LowbitError(f"{where}:{i} has none of the fields {', '.join(_PROMPT_FIELDS)}")
        out.append(text)
    return out


@dataclass(frozen=True)
class GenerationConfig:
    """How the base answers. Greedy unless `do_sample`. Prompts go through `generate` in left-padded
    batches of `batch_size` (1: each prompt alone, numerically the plain greedy continuation);
    sampling is seeded per batch (seed + index of its first prompt)."""

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 8


def prompt_ids(tokenizer, prompt: str) -> torch.Tensor:
    """The prompt as the model's chat template renders a single user turn (with the assistant
    header), or the bare prompt and a newline for a tokenizer without a template. Shapes: -> [T]."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True)
        if hasattr(ids, "keys"):  # a BatchEncoding in some transformers versions
            ids = ids["input_ids"]
        return torch.tensor(list(ids), dtype=torch.long).reshape(-1)
    return tokenizer(prompt + "\n", return_tensors="pt").input_ids[0]


@dataclass
class AnswerSet:
    """The base's answers and what scoring needs of the base. Shapes: prompts[i] [P_i],
    answers[i] [A_i], hidden[i] [A_i, hidden] (the base's final hidden states at the positions that
    predict answer i's tokens)."""

    prompts: list[torch.Tensor]
    answers: list[torch.Tensor]
    hidden: list[torch.Tensor]
    head: BaseHead
    meta: dict

    @property
    def lengths(self) -> list[int]:
        return [int(a.numel()) for a in self.answers]


def _eos_ids(model, tokenizer) -> list[int]:
    ids = set()
    for src in (getattr(model, "generation_config", None), model.config, tokenizer):
        e = getattr(src, "eos_token_id", None)
        if e is not None:
            ids.update(e if isinstance(e, (list, tuple)) else [e])
    return sorted(int(i) for i in ids)


@torch.inference_mode()
def generate_answers(model, tokenizer, prompts: PromptSet, gen: GenerationConfig, device: str = "cpu",
                     progress: bool = True) -> AnswerSet:
    """Let `model` (the base) answer every prompt, then record its hidden states on its answers.

    Each answer ends at (and includes) the first end-of-sequence token, or at `max_new_tokens`.
    Empty answers are dropped.
    """
    if gen.batch_size < 1 or gen.max_new_tokens < 1:
        raise LowbitError("answers need a batch size and --max-new-tokens of at least 1")
    eos = _eos_ids(model, tokenizer)
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if pad is not None else (eos[0] if eos else 0)
    kw = dict(max_new_tokens=gen.max_new_tokens, do_sample=gen.do_sample, pad_token_id=pad, eos_token_id=eos or None)
    if gen.do_sample:
        kw.update(temperature=gen.temperature, top_p=gen.top_p, top_k=0)
    else:
        kw.update(temperature=None, top_p=None, top_k=None)
    chat = [prompt_ids(tokenizer, t) for t in prompts.prompts]
    ps, ans, hid = [], [], []
    bar = tqdm(total=len(chat), desc="base answers", unit="prompt", disable=not progress)
    for b0 in range(0, len(chat), gen.batch_size):
        batch = chat[b0:b0 + gen.batch_size]
        T = max(p.numel() for p in batch)
        x = torch.full((len(batch), T), pad, dtype=torch.long)
        mask = torch.zeros_like(x)
        for i, p in enumerate(batch):  # left padding: every prompt ends where generation starts
            x[i, T - p.numel():], mask[i, T - p.numel():] = p, 1
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(gen.seed + b0)
            out = model.generate(x.to(device), attention_mask=mask.to(device), **kw)[:, T:].cpu()
        for i, p in enumerate(batch):
            stop = [j for j, t in enumerate(out[i].tolist()) if t in eos]
            a = out[i, : stop[0] + 1] if stop else out[i]
            if a.numel() == 0:
                log.warning("the base gave an empty answer to prompt %d; skipped", b0 + i)
                continue
            seq = torch.cat([p, a])[None].to(device)
            h = final_hidden(model, seq, check=not hid)[0, p.numel() - 1: -1]  # positions predicting a
            ps.append(p.cpu())
            ans.append(a.cpu())
            hid.append(h.cpu())
        bar.update(len(batch))
    bar.close()
    if not ans:
        raise LowbitError("the base answered no prompt with a single token")
    return AnswerSet(ps, ans, hid, BaseHead.of(model).to("cpu"), {"prompts": prompts.name,
                                                                  "generation": asdict(gen)})


def answers_key(base_hash: str, prompts: PromptSet, gen: GenerationConfig, chat: list[torch.Tensor]) -> str:
    """Key of one (base content, rendered prompts, generation settings) combination."""
    ids = hashlib.sha256(b"".join(t.to(torch.int64).numpy().tobytes() + b"|" for t in chat)).hexdigest()
    blob = json.dumps({"v": ANSWERS_VERSION, "base": base_hash, "prompts": prompts.sha256, "ids": ids,
                       "gen": asdict(gen)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def save_answers(directory: Path, s: AnswerSet) -> None:
    with atomic_dir(directory) as tmp:
        tensors = {}
        for i, (p, a, h) in enumerate(zip(s.prompts, s.answers, s.hidden)):
            tensors[f"prompt.{i}"], tensors[f"answer.{i}"], tensors[f"hidden.{i}"] = (
                p.contiguous(), a.contiguous(), h.contiguous())
        save_file(tensors, tmp / "answers.safetensors")
        head = {"weight": s.head.weight.contiguous(), **({} if s.head.bias is None else {"bias": s.head.bias})}
        save_file(head, tmp / "head.safetensors")
        (tmp / "meta.json").write_text(json.dumps({**s.meta, "version": ANSWERS_VERSION, "n": len(s.answers),
                                                   "softcap": s.head.softcap}, indent=2))


def read_answers(directory: Path) -> AnswerSet | None:
    d = Path(directory)
    if not (d / "meta.json").is_file():
        return None
    meta = json.loads((d / "meta.json").read_text())
    if meta.get("version") != ANSWERS_VERSION:
        return None
    with safe_open(d / "answers.safetensors", framework="pt") as f:
        get = f.get_tensor
        n = meta["n"]
        ps, ans, hid = ([get(f"{k}.{i}") for i in range(n)] for k in ("prompt", "answer", "hidden"))
    with safe_open(d / "head.safetensors", framework="pt") as f:
        head = BaseHead(f.get_tensor("weight"), f.get_tensor("bias") if "bias" in f.keys() else None,
                        meta.get("softcap"))
    return AnswerSet(ps, ans, hid, head, meta)


def base_answers(base_path: str, prompts: PromptSet, gen: GenerationConfig, device: str = "cpu",
                 use_cache: bool = True, cache_root: Path | None = None, progress: bool = True) -> AnswerSet:
    """The base's answers to `prompts`, from the cache when it holds them (the base is then not loaded)."""
    from transformers import AutoTokenizer
    base_dir = resolve_model_dir(base_path)
    tok = AutoTokenizer.from_pretrained(base_dir)
    if not use_cache:
        return generate_answers(load_causal_lm(str(base_path), device)[0], tok, prompts, gen, device, progress)
    root = Path(cache_root) if cache_root is not None else cache_dir("eval")
    root.mkdir(parents=True, exist_ok=True)
    chat = [prompt_ids(tok, p) for p in prompts.prompts]
    key = answers_key(checkpoint_hash(base_dir, root / "checkpoint-hashes.json"), prompts, gen, chat)
    d = root / f"answers-{key}"
    cached = read_answers(d)
    if cached is not None:
        log.info("base answers reused from %s", d)
        return cached
    s = generate_answers(load_causal_lm(str(base_path), device)[0], tok, prompts, gen, device, progress)
    s.meta.update(base=str(base_path), base_dir=str(base_dir))
    save_answers(d, s)
    log.info("base answers written to %s", d)
    return s


@torch.inference_mode()
def score_answers(model_path: str, answers: AnswerSet, device: str = "cpu", progress: bool = True) -> TokenStats:
    """Per-answer-token stats of candidate `model_path` against the base, teacher-forced on the base's answers."""
    model, _ = load_causal_lm(str(model_path), device)
    head = answers.head.to(device)
    parts = []
    for p, a, h in tqdm(list(zip(answers.prompts, answers.answers, answers.hidden)), desc=Path(str(model_path)).name,
                        unit="answer", disable=not progress):
        seq = torch.cat([p, a])[None].to(device)
        lc = model(input_ids=seq).logits[0, p.numel() - 1: -1].float()
        lb = head(h.to(device))
        if lb.shape != lc.shape:
            raise LowbitError(f"{model_path} has vocabulary {lc.shape[-1]}, the base {lb.shape[-1]}; "
                              "a candidate must share the base's tokenizer")
        parts.append(token_stats(lb, lc, a.to(device)))
    del model
    return TokenStats.concat(parts)


def evaluate_answers(model_paths: list[str], base_path: str, prompts: str | None = None,
                     n_prompts: int | None = None, gen: GenerationConfig = GenerationConfig(), device: str = "cpu",
                     progress: bool = True, use_cache: bool = True, cache_root: Path | None = None,
                     n_bootstrap: int = 1000, seed: int = 0) -> list[EvalResult]:
    """Score every candidate on the base's own answers to the prompt set.

    Each result's metrics are `summarize`'s (on answer tokens only) plus 95% intervals for
    CI_FIGURES, resampling whole answers. ``window_tokens`` holds each answer's length.
    """
    if not model_paths:
        raise LowbitError("no candidate models to evaluate")
    ps = load_prompts(prompts, n_prompts)
    cand_dirs = [resolve_model_dir(p) for p in model_paths]
    s = base_answers(base_path, ps, gen, device, use_cache, cache_root, progress)
    lengths = s.lengths
    results = []
    for path, d in zip(model_paths, cand_dirs):
        stats = score_answers(path, s, device, progress)
        metrics = summarize(stats)
        metrics["ppl_increase_pct"] = 100.0 * (metrics["ppl"] / metrics["ppl_base"] - 1)
        metrics["answers"] = len(lengths)
        if n_bootstrap > 0:
            ci = bootstrap_ci(window_sums(stats, lengths), n_bootstrap, 0.95, seed)
            for k in CI_FIGURES:
                metrics[f"{k}_ci_lo"], metrics[f"{k}_ci_hi"] = ci[k]
        metrics["size_bytes"] = model_size_bytes(d)
        results.append(EvalResult(str(path), str(base_path), f"answers:{ps.name}", gen.max_new_tokens,
                                  len(lengths), metrics, stats, window_tokens=lengths))
    return results
