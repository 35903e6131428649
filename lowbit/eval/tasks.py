"""Task evaluation: does quantization cost answers, not just log-probabilities?

Two kinds of item, scored for the base and every candidate:

* multiple choice (``"choices"``): the log-likelihood of each choice given the context, summed over
  the choice's tokens, as lm-evaluation-harness scores ``multiple_choice`` tasks: the context and
  ``delimiter + choice`` (default delimiter one space) are encoded together and the choice's tokens
  are those past the context's encoding; trailing spaces of the context move into the choice.
  ``acc``: the most likely choice is the answer. ``acc_norm``: likelihood divided by the choice's
  length in UTF-8 bytes.
* exact answer (``"prompt"`` + ``"answer"``): greedy generation up to ``max_tokens`` (16), cut at
  the first of ``until`` (default a newline); ``exact_match`` after normalization (lower case,
  punctuation and the articles a/an/the removed, whitespace collapsed) against the answer or any
  of a list of accepted answers.

Task file (``.jsonl``), one item a line::

  {"task": "arithmetic", "context": "Question: What is 7 + 5?\\nAnswer:", "choices": ["12", "11"], "answer": 0}
  {"task": "capitals", "prompt": "Q: What is the capital of Peru?\\nA:", "answer": "Lima", "until": ["\\n"]}

``answer`` of a choice item is an index or the choice's text. ``task`` defaults to the file's stem.
``demo`` names the small embedded set (lowbit/data/tasks/demo.jsonl: arithmetic, commonsense,
capitals, antonyms; 60 items written for lowbit, public domain / CC0).

lm-evaluation-harness task names (``hellaswag``, ``arc_easy`` ...) are read through its own task
definitions when `lm_eval` is installed and its datasets are reachable (zero-shot, its prompts and
targets, `--task-limit` items each).

Per task: the primary score (``acc`` or ``exact_match``) of base and candidate, the drop
(base − candidate, accuracy points as a fraction), and 95% bootstrap intervals over items; the drop
interval is paired (the same items resampled for both).
"""
from __future__ import annotations

import logging
import re
import string
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import LowbitError
from ..model.compat import cached_forward
from ..model.source import resolve_model_dir
from .evaluate import load_causal_lm

log = logging.getLogger(__name__)

EMBEDDED_TASKS = {"demo": "demo.jsonl"}


@dataclass(frozen=True)
class ChoiceItem:
    task: str
    context: str
    choices: tuple[str, ...]
    answer: int
    delimiter: str = " "


@dataclass(frozen=True)
class ExactItem:
    task: str
    prompt: str
    answers: tuple[str, ...]
    until: tuple[str, ...] = ("\n",)
    max_tokens: int = 16


Item = ChoiceItem | ExactItem


# -- reading ------------------------------------------------------------------------------------
def load_tasks(source: str, limit: int | None = None) -> list[Item]:
    """Items from a .jsonl file, the embedded ``demo`` set, or lm-evaluation-harness task names
    (comma-separated). `limit` caps the items of each task."""
    p = Path(source).expanduser()
    if p.is_file():
        items = parse_items(p.read_text(encoding="utf-8"), str(p), default_task=p.stem)
    elif source in EMBEDDED_TASKS:
        raw = resources.files("lowbit.data").joinpath("tasks", EMBEDDED_TASKS[source]).read_text(encoding="utf-8")
        items = parse_items(raw, f"lowbit/data/tasks/{EMBEDDED_TASKS[source]}", default_task=source)
    elif source.endswith((".jsonl", ".json")) or "/" in source:
        raise LowbitError(f"task file {source} not found")
    else:
        items = lm_eval_items([s.strip() for s in source.split(",") if s.strip()], limit)
    if limit is not None:
        seen: dict[str, int] = {}
        kept = []
        for it in items:
            seen[it.task] = seen.get(it.task, 0) + 1
            if seen[it.task] <= limit:
                kept.append(it)
        items = kept
    if not items:
        raise LowbitError(f"no task items in {source}")
    return items


def parse_items(raw: str, where: str, default_task: str = "tasks") -> list[Item]:
    import json
    items: list[Item] = []
    for i, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError:
            raise LowbitError(f"{where}:{i} is not valid JSON") from None
        if not isinstance(d, dict):
            raise LowbitError(f"{where}:{i} is not a JSON object")
        items.append(_item(d, f"{where}:{i}", default_task))
    return items


def _item(d: dict, where: str, default_task: str) -> Item:
    task = str(d.get("task", default_task))
    if "choices" in d:
        ch = d["choices"]
        if not isinstance(ch, list) or len(ch) < 2 or not all(isinstance(c, str) for c in ch):
            raise LowbitError(f"{where}: \"choices\" must be a list of at least two strings")
        if not isinstance(d.get("context"), str):
            raise LowbitError(f"{where}: a multiple-choice item needs a \"context\" string")
        ans = d.get("answer")
        if isinstance(ans, str) and ans in ch:
            ans = ch.index(ans)
        if not isinstance(ans, int) or isinstance(ans, bool) or not 0 <= ans < len(ch):
            raise LowbitError(f"{where}: \"answer\" must be an index into choices (0..{len(ch) - 1}) or one of them")
        return ChoiceItem(task, d["context"], tuple(ch), ans, str(d.get("delimiter", " ")))
    if isinstance(d.get("prompt"), str) and "answer" in d:
        ans = d["answer"]
        answers = tuple(str(a) for a in (ans if isinstance(ans, list) else [ans]))
        until = d.get("until", ["\n"])
        until = tuple(until if isinstance(until, list) else [until])
        return ExactItem(task, d["prompt"], answers, until, int(d.get("max_tokens", 16)))
    raise LowbitError(f"{where}: an item needs either \"context\" + \"choices\" + \"answer\" (multiple choice) "
                      "or \"prompt\" + \"answer\" (exact answer)")


def lm_eval_items(names: list[str], limit: int | None = None) -> list[Item]:
    """Items of lm-evaluation-harness tasks, converted from its own task definitions (zero-shot)."""
    try:
        from lm_eval.tasks import TaskManager, get_task_dict
    except ImportError:
        raise LowbitError(f"{', '.join(names)}: not a task file and not an embedded set (demo); lm-evaluation-harness "
                          "task names need `pip install lm-eval` with its datasets reachable from the hub, "
                          "otherwise pass a local tasks .jsonl file (format: lowbit/data/tasks/demo.jsonl)") from None
    try:
        tasks = _flatten(get_task_dict(names, TaskManager()))
    except Exception as e:  # unknown names, datasets not reachable, ...
        raise LowbitError(f"lm-evaluation-harness could not load {', '.join(names)} "
                          f"({type(e).__name__}: {e}); pass a local tasks .jsonl file instead") from e
    items: list[Item] = []
    for name, task in tasks.items():
        items += items_from_lm_eval_task(name, task, limit)
    return items


def _flatten(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v))
        else:
            out[getattr(k, "group_name", None) or getattr(v, "task_name", None) or str(k)] = v
    return out


def items_from_lm_eval_task(name: str, task, limit: int | None = None) -> list[Item]:
    """One lm-eval Task's documents as items (duck-typed on its public methods)."""
    docs = None
    for split in ("has_test_docs", "has_validation_docs"):
        if getattr(task, split)():
            docs = task.test_docs() if split == "has_test_docs" else task.validation_docs()
            break
    if docs is None:
        raise LowbitError(f"lm-eval task {name} has no test or validation documents")
    cfg = getattr(task, "config", None)
    delim = getattr(cfg, "target_delimiter", " ") if cfg is not None else " "
    kind = getattr(task, "OUTPUT_TYPE", None) or getattr(cfg, "output_type", None)
    items: list[Item] = []
    for i, doc in enumerate(docs):
        if limit is not None and i >= limit:
            break
        ctx = task.doc_to_text(doc)
        target = task.doc_to_target(doc)
        if kind == "multiple_choice":
            ch = [str(c) for c in task.doc_to_choice(doc)]
            ans = target if isinstance(target, int) else ch.index(str(target))
            items.append(ChoiceItem(name, str(ctx), tuple(ch), int(ans), delim))
        elif kind == "generate_until":
            gk = dict(getattr(cfg, "generation_kwargs", None) or {})
            until = gk.get("until") or ["\n"]
            ans = target if isinstance(target, list) else [target]
            items.append(ExactItem(name, str(ctx), tuple(str(a) for a in ans),
                                   tuple(until if isinstance(until, list) else [until]),
                                   int(gk.get("max_gen_toks", 32))))
        else:
            raise LowbitError(f"lm-eval task {name} has output type {kind!r}; lowbit scores multiple_choice "
                              "and generate_until tasks")
    return items


# -- scoring (the model's side) -----------------------------------------------------------------
def normalize_answer(s: str) -> str:
    """Lower case, no punctuation, no articles (a, an, the), single spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's split: trailing spaces of the context move into the continuation,
    the continuation's tokens are those of ``context + continuation`` past the context's."""
    n = len(context) - len(context.rstrip())
    if n:
        continuation, context = context[-n:] + continuation, context[:-n]
    enc = lambda t: tokenizer(t, add_special_tokens=False).input_ids  # noqa: E731
    whole, ctx = enc(context + continuation), enc(context)
    if not ctx:  # an empty context: condition on the end-of-text token, as lm-eval does
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [bos], whole
    return ctx, whole[len(ctx):]


@torch.inference_mode()
def choice_logliks(model, tokenizer, item: ChoiceItem, device: str = "cpu") -> list[float]:
    """Summed log-likelihood of each choice's tokens given the context (all choices in one
    right-padded batch; padding comes after every scored position, so it changes nothing)."""
    pairs = [encode_pair(tokenizer, item.context, item.delimiter + c) for c in item.choices]
    for c, (_, cont) in zip(item.choices, pairs):
        if not cont:
            raise LowbitError(f"task {item.task}: choice {c!r} encodes to no tokens")
    seqs = [ctx + cont for ctx, cont in pairs]
    T = max(map(len, seqs))
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
    lp = torch.log_softmax(model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float(), -1)
    out = []
    for i, (ctx, cont) in enumerate(pairs):
        rows = lp[i, len(ctx) - 1: len(ctx) - 1 + len(cont)]
        out.append(float(rows.gather(-1, torch.tensor(cont, device=device)[:, None]).sum()))
    return out


@torch.inference_mode()
def greedy_answer(model, tokenizer, item: ExactItem, device: str = "cpu") -> str:
    """Greedy continuation of the prompt, cut at the first `until` string."""
    ids = tokenizer(item.prompt, add_special_tokens=False, return_tensors="pt").input_ids.to(device)
    eos = tokenizer.eos_token_id
    past, text, new = None, "", []
    x = ids
    for _ in range(item.max_tokens):
        logits, past = cached_forward(model, x, past)
        nxt = int(logits[0, -1].argmax())
        if nxt == eos:
            break
        new.append(nxt)
        text = tokenizer.decode(new, skip_special_tokens=True)
        if any(u in text for u in item.until):
            break
        x = torch.tensor([[nxt]], device=device)
    cut = min((text.find(u) for u in item.until if u in text), default=len(text))
    return text[:cut]


@dataclass
class ItemScores:
    """Per-item 0/1 outcomes of one model, by task and metric. Shapes: each list [n_items_of_task]."""

    by_task: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)

    def add(self, task: str, kind: str, **metrics: float) -> None:
        if self.kinds.setdefault(task, kind) != kind:
            raise LowbitError(f"task {task} mixes multiple-choice and exact-answer items")
        for k, v in metrics.items():
            self.by_task.setdefault(task, {}).setdefault(k, []).append(float(v))


def primary_metric(kind: str) -> str:
    return "acc" if kind == "choice" else "exact_match"


def score_items(model, tokenizer, items: list[Item], device: str = "cpu", progress: bool = True,
                desc: str = "tasks") -> ItemScores:
    s = ItemScores()
    for it in tqdm(items, desc=desc, unit="item", disable=not progress):
        if isinstance(it, ChoiceItem):
            ll = choice_logliks(model, tokenizer, it, device)
            norm = [v / max(len(it.choices[j].encode()), 1) for j, v in enumerate(ll)]
            s.add(it.task, "choice", acc=_argmax(ll) == it.answer, acc_norm=_argmax(norm) == it.answer)
        else:
            got = normalize_answer(greedy_answer(model, tokenizer, it, device))
            s.add(it.task, "exact", exact_match=any(got == normalize_answer(a) for a in it.answers))
    return s


def _argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=lambda i: xs[i])


# -- figures (pure) -----------------------------------------------------------------------------
def mean_ci(x: torch.Tensor, n_resamples: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile interval of the mean of `x` [n], items resampled with replacement."""
    x = x.double().reshape(-1)
    if x.numel() < 2 or n_resamples <= 0:
        return float(x.mean()), float(x.mean())
    g = torch.Generator().manual_seed(seed)
    means = x[torch.randint(0, x.numel(), (n_resamples, x.numel()), generator=g)].mean(1)
    q = torch.tensor([(1 - level) / 2, 1 - (1 - level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(means, q).tolist()
    return lo, hi


def task_figures(base: ItemScores, cand: ItemScores, n_bootstrap: int = 1000, seed: int = 0) -> dict[str, dict]:
    """Per task: score, base score, drop (base − candidate) with 95% intervals; the other metrics too."""
    out = {}
    for task, kind in cand.kinds.items():
        metric = primary_metric(kind)
        c = torch.tensor(cand.by_task[task][metric], dtype=torch.float64)
        b = torch.tensor(base.by_task[task][metric], dtype=torch.float64)
        if b.shape != c.shape:
            raise LowbitError(f"task {task}: the base and the candidate were scored on different items")
        lo, hi = mean_ci(c, n_bootstrap, seed=seed)
        dlo, dhi = mean_ci(b - c, n_bootstrap, seed=seed)
        row = {"kind": kind, "metric": metric, "n": int(c.numel()), "score": float(c.mean()), "score_ci_lo": lo,
               "score_ci_hi": hi, "base": float(b.mean()), "drop": float((b - c).mean()), "drop_ci_lo": dlo,
               "drop_ci_hi": dhi}
        for other, vals in cand.by_task[task].items():
            if other != metric:
                row[other] = sum(vals) / len(vals)
                row[f"base_{other}"] = sum(base.by_task[task][other]) / len(base.by_task[task][other])
        out[task] = row
    return out


def base_figures(base: ItemScores) -> dict[str, float]:
    return {t: sum(base.by_task[t][primary_metric(k)]) / len(base.by_task[t][primary_metric(k)])
            for t, k in base.kinds.items()}


# -- the whole evaluation -----------------------------------------------------------------------
@dataclass
class TaskReport:
    source: str
    base: str
    base_scores: dict[str, float]
    results: dict[str, dict[str, dict]]   # candidate -> task -> figures


def evaluate_tasks(model_paths: list[str], base_path: str, source: str, device: str = "cpu",
                   limit: int | None = None, progress: bool = True, n_bootstrap: int = 1000,
                   seed: int = 0) -> TaskReport:
    """Score the base and every candidate on the task items of `source` (one model in memory at a time)."""
    from transformers import AutoTokenizer
    items = load_tasks(source, limit)
    tok = AutoTokenizer.from_pretrained(resolve_model_dir(base_path))

    def run(path: str) -> ItemScores:
        model, _ = load_causal_lm(str(path), device)
        try:
            return score_items(model, tok, items, device, progress, desc=Path(str(path)).name)
        finally:
            del model

    base = run(base_path)
    results = {str(p): task_figures(base, run(p), n_bootstrap, seed) for p in model_paths}
    return TaskReport(source, str(base_path), base_figures(base), results)


def format_tasks(rep: TaskReport) -> str:
    """Plain-text table: one row per candidate and task."""
    head = ["model", "task", "n", "metric", "base", "score [95% CI]", "drop [95% CI]"]
    rows = []
    for model, tasks in rep.results.items():
        for t, r in tasks.items():
            rows.append([model, t, str(r["n"]), r["metric"], f"{r['base']:.3f}",
                         f"{r['score']:.3f} [{r['score_ci_lo']:.3f}, {r['score_ci_hi']:.3f}]",
                         f"{100 * r['drop']:+.1f} pts [{100 * r['drop_ci_lo']:+.1f}, {100 * r['drop_ci_hi']:+.1f}]"])
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = lambda v: "  ".join(x.ljust(w) if i < 4 else x.rjust(w) for i, (x, w) in enumerate(zip(v, widths)))  # noqa: E731
    title = f"tasks: {rep.source}  base: {rep.base}  (drop = base − candidate, accuracy points; 95% CI, items resampled)"
    return "\n".join([title, line(head), "-" * len(line(head)), *map(line, rows)])
