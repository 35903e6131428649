"""The approval gate: a quantized artifact ships only if broad drift, task regressions and serving
all pass (the three gates of the evaluation guide). Pure: results and thresholds in, verdicts out.

A result is one candidate's dict as `lowbit eval --json` writes it, optionally extended with

  "tasks":   {"gsm8k": {"base": 0.61, "score": 0.60}, ...}    or  {"gsm8k": 0.60} + "base_tasks": {...}
  "serving": {"tokens_per_s": 812, "p95_ms": 49, "memory_bytes": 4.4e9}   (or the same keys at top level;
             memory may also be given as "memory_gib")
  "answers": {"kld_mean": ..., "top1": ...}   (KLD on the base's own answers; the drift gate judges
             these when the result has no held-out-text figures at its top level)

`lowbit eval --json` with --tasks / --serving / --answers writes exactly these shapes; its task
rows also carry "drop_ci_hi", which `use_ci` judges instead of the point drop.

A threshold that is set but whose figure was not measured fails: a gate cannot approve what it
did not see. Task drops are in accuracy points (1% = 0.01 absolute); the perplexity increase is
relative (3% = ppl / ppl_base − 1 ≤ 0.03).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from ..errors import LowbitError
from .size import format_bytes, parse_bytes


@dataclass(frozen=True)
class Thresholds:
    max_kld: float | None = None            # mean KLD(base ‖ candidate), nats
    min_top1: float | None = None           # top-1 agreement with the base
    max_ppl_increase: float | None = None   # fraction: 0.03 = +3%
    max_task_drop: float | None = None      # accuracy points as a fraction: 0.01 = 1 point, every task
    task_drops: tuple[tuple[str, float], ...] = ()  # per-task overrides of max_task_drop
    max_memory: int | None = None           # bytes
    min_tokens_per_s: float | None = None       # decode tokens/s
    min_prefill_tokens_per_s: float | None = None
    max_p95_ms: float | None = None             # per-token decode latency, milliseconds
    use_ci: bool = False                    # judge the pessimistic end of the 95% interval when present

    def is_empty(self) -> bool:
        return all(getattr(self, f.name) in (None, (), False) for f in fields(self) if f.name != "use_ci")


@dataclass(frozen=True)
class Check:
    gate: str          # "drift", "tasks" or "serving"
    name: str
    value: float | None
    limit: float
    kind: str          # "max" or "min"
    passed: bool
    detail: str

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Verdict:
    candidate: str
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def to_json(self) -> dict:
        return {"candidate": self.candidate, "passed": self.passed, "checks": [c.to_json() for c in self.checks]}


# -- reading thresholds -------------------------------------------------------------------------
def parse_percent(s: str | float, what: str) -> float:
    """'3%' -> 0.03, '0.03' -> 0.03; a bare number above 1 is refused as ambiguous."""
    if isinstance(s, (int, float)):
        v = float(s)
    else:
        t = s.strip()
        try:
            if t.endswith("%"):
                return float(t[:-1]) / 100
            v = float(t)
        except ValueError:
            raise LowbitError(f"{what}: cannot read {s!r}; write e.g. 3% or 0.03") from None
    if v > 1:
        raise LowbitError(f"{what}: {s!r} is ambiguous; write {v:g}% or {v / 100:g}")
    return v


_KEYS = {"max_kld": float, "min_top1": float, "max_ppl_increase": "pct", "max_task_drop": "pct",
         "max_memory": "bytes", "min_tokens_per_s": float, "min_prefill_tokens_per_s": float, "max_p95_ms": float,
         "max_p95_latency": "ms", "use_ci": bool, "tasks": "tasks"}


def parse_ms(s: str | float, what: str = "max_p95_latency") -> float:
    """'50ms' -> 50, '0.05s' -> 50, '50' -> 50 (a bare number is milliseconds)."""
    if isinstance(s, (int, float)):
        return float(s)
    t = str(s).strip().lower()
    try:
        if t.endswith("ms"):
            return float(t[:-2])
        if t.endswith("us") or t.endswith("µs"):
            return float(t[:-2]) / 1000
        if t.endswith("s"):
            return float(t[:-1]) * 1000
        return float(t)
    except ValueError:
        raise LowbitError(f"{what}: cannot read {s!r}; write e.g. 50ms or 0.05s") from None


def thresholds_from_dict(d: dict) -> Thresholds:
    """Thresholds from a YAML/JSON mapping with the same names as the command-line flags
    (``max_kld``, ``min_top1``, ``max_ppl_increase: 3%``, ``max_task_drop: 1%``, ``max_memory: 8GiB``,
    ``min_tokens_per_s``, ``max_p95_ms``, ``use_ci``, and ``tasks: {name: 2%}`` per-task drops)."""
    unknown = sorted(set(d) - set(_KEYS) - {k.replace("_", "-") for k in _KEYS})
    if unknown:
        raise LowbitError(f"unknown gate threshold(s) {', '.join(unknown)}; known: {', '.join(_KEYS)}")
    kw = {}
    for key, value in d.items():
        key = key.replace("-", "_")
        kind = _KEYS[key]
        if value is None:
            continue
        if kind == "pct":
            kw[key] = parse_percent(value, key)
        elif kind == "bytes":
            kw[key] = parse_bytes(value)
        elif kind == "ms":
            kw["max_p95_ms"] = parse_ms(value, key)
        elif kind == "tasks":
            if not isinstance(value, dict):
                raise LowbitError("tasks: give a mapping of task name to maximum drop, e.g. {gsm8k: 2%}")
            kw["task_drops"] = tuple(sorted((str(k), parse_percent(v, f"tasks.{k}")) for k, v in value.items()))
        elif kind is bool:
            kw[key] = bool(value)
        else:
            try:
                kw[key] = float(value)
            except (TypeError, ValueError):
                raise LowbitError(f"{key}: {value!r} is not a number") from None
    return Thresholds(**kw)


def results_list(doc) -> list[dict]:
    """Candidates from an eval JSON: {"results": [...]}, a list of results, or one flat result."""
    if isinstance(doc, dict) and isinstance(doc.get("results"), list):
        shared = {k: v for k, v in doc.items() if k != "results"}
        return [{**shared, **r} for r in doc["results"]]
    if isinstance(doc, list):
        return [r for r in doc if isinstance(r, dict)]
    if isinstance(doc, dict):
        return [doc]
    raise LowbitError("the results file holds neither a result object nor a list of results")


# -- figures ------------------------------------------------------------------------------------
def _num(x) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _first(r: dict, *keys) -> float | None:
    for container in (r.get("serving") or {}, r):
        for k in keys:
            if k in container and _num(container[k]) is not None:
                return _num(container[k])
    return None


def task_scores(r: dict) -> dict[str, tuple[float | None, float | None]]:
    """task -> (base accuracy, candidate accuracy), from either accepted shape."""
    tasks = r.get("tasks") or {}
    base = r.get("base_tasks") or {}
    out = {}
    for name, v in tasks.items():
        if isinstance(v, dict):
            cand = _num(v.get("score", v.get("candidate", v.get("accuracy"))))
            out[name] = (_num(v.get("base", base.get(name))), cand)
        else:
            out[name] = (_num(base.get(name)), _num(v))
    return out


def _memory_bytes(r: dict) -> float | None:
    b = _first(r, "memory_bytes", "peak_memory_bytes", "vram_bytes")
    if b is not None:
        return b
    g = _first(r, "memory_gib", "vram_gib")
    return None if g is None else g * 2**30


# -- the gate -----------------------------------------------------------------------------------
def _check(gate: str, name: str, value: float | None, limit: float, kind: str, fmt) -> Check:
    if value is None:
        return Check(gate, name, None, limit, kind, False, f"{name} not measured (limit {kind} {fmt(limit)})")
    ok = value <= limit if kind == "max" else value >= limit
    if ok:
        return Check(gate, name, value, limit, kind, True,
                     f"{name} {fmt(value)} {'≤' if kind == 'max' else '≥'} {fmt(limit)}")
    gap = value - limit if kind == "max" else limit - value
    rel = f", {gap / abs(limit):.0%} of the limit" if limit else ""
    word = "over" if kind == "max" else "short"
    return Check(gate, name, value, limit, kind, False,
                 f"{name} {fmt(value)} {'>' if kind == 'max' else '<'} {kind} {fmt(limit)} ({word} by {fmt(gap)}{rel})")


def gate(result: dict, th: Thresholds) -> Verdict:
    """Every threshold of `th` checked against one candidate's result."""
    v = Verdict(str(result.get("model", "?")))
    ci = th.use_ci
    g = lambda *k: _first(result, *k)  # noqa: E731
    drift_src = result if _num(result.get("kld_mean")) is not None else (result.get("answers") or {})
    d = lambda *k: _first({k2: v2 for k2, v2 in drift_src.items() if k2 != "serving"}, *k)  # noqa: E731

    def pick(ci_key: str, *keys: str) -> float | None:
        bound = d(ci_key) if ci else None
        return bound if bound is not None else d(*keys)

    sfx = " (95% CI bound)" if ci else ""
    on = "" if drift_src is result else " (answers)"
    if th.max_kld is not None:
        val = pick("kld_mean_ci_hi", "kld_mean")
        v.checks.append(_check("drift", "kld_mean" + on + sfx, val, th.max_kld, "max", lambda x: f"{x:.5g}"))
    if th.min_top1 is not None:
        val = pick("top1_ci_lo", "top1", "same_top_p")
        v.checks.append(_check("drift", "top1" + on + sfx, val, th.min_top1, "min", lambda x: f"{x:.4f}"))
    if th.max_ppl_increase is not None:
        val = None
        if ci and d("ppl_increase_pct_ci_hi") is not None:
            val = d("ppl_increase_pct_ci_hi") / 100
        elif d("ppl") is not None and d("ppl_base"):
            val = d("ppl") / d("ppl_base") - 1
        v.checks.append(_check("drift", "ppl_increase" + on + sfx, val, th.max_ppl_increase, "max",
                               lambda x: f"{100 * x:.2f}%"))
    overrides = dict(th.task_drops)
    if th.max_task_drop is not None or overrides:
        scores = task_scores(result)
        names = sorted(set(scores) | set(overrides))
        if not names:
            v.checks.append(_check("tasks", "task scores", None, th.max_task_drop or 0.0, "max",
                                   lambda x: f"{100 * x:.2f} pts"))
        for name in names:
            limit = overrides.get(name, th.max_task_drop)
            if limit is None:
                continue
            base, cand = scores.get(name, (None, None))
            drop = None if base is None or cand is None else base - cand
            row = (result.get("tasks") or {}).get(name)
            if ci and drop is not None and isinstance(row, dict) and _num(row.get("drop_ci_hi")) is not None:
                drop = _num(row["drop_ci_hi"])
            v.checks.append(_check("tasks", f"task {name} drop" + sfx, drop, limit, "max",
                                   lambda x: f"{100 * x:.2f} pts"))
    if th.max_memory is not None:
        v.checks.append(_check("serving", "memory", _memory_bytes(result), th.max_memory, "max", format_bytes))
    if th.min_tokens_per_s is not None:
        v.checks.append(_check("serving", "tokens_per_s", g("tokens_per_s", "tokens_per_second", "tps"),
                               th.min_tokens_per_s, "min", lambda x: f"{x:.1f}"))
    if th.min_prefill_tokens_per_s is not None:
        v.checks.append(_check("serving", "prefill_tokens_per_s", g("prefill_tokens_per_s"),
                               th.min_prefill_tokens_per_s, "min", lambda x: f"{x:.1f}"))
    if th.max_p95_ms is not None:
        v.checks.append(_check("serving", "p95_ms", g("p95_ms", "p95_latency_ms"), th.max_p95_ms, "max",
                               lambda x: f"{x:.1f} ms"))
    return v


def gate_all(results: list[dict], th: Thresholds) -> list[Verdict]:
    if th.is_empty():
        raise LowbitError("no thresholds given; pass e.g. --max-kld 0.02 --min-top1 0.95 or --thresholds gate.yaml")
    return [gate(r, th) for r in results]


def format_verdicts(verdicts: list[Verdict]) -> str:
    lines = []
    for v in verdicts:
        n_fail = len(v.failures)
        lines.append(f"{v.candidate}: {'PASS' if v.passed else f'FAIL ({n_fail} of {len(v.checks)} checks)'}")
        for c in v.checks:
            lines.append(f"  {'ok  ' if c.passed else 'FAIL'} {c.gate:<8} {c.detail}")
    approved = [v.candidate for v in verdicts if v.passed]
    lines.append(f"approved: {', '.join(approved) if approved else 'none'}")
    return "\n".join(lines)
