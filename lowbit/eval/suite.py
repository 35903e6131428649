"""One JSON document and one printout for everything `lowbit eval` measured.

Per candidate (under "results", and at the top level too when there is one candidate, the shape
`lowbit eval --json` always had): the held-out-text figures at the top level of the row (when
text was scored), ``answers`` (KLD on the base's own answers), ``tasks`` (per task: score, base,
drop with intervals) and ``serving`` (tokens/s, p95 latency, memory). Shared at the top level:
``base_tasks`` and ``base_serving``. `lowbit gate` and `lowbit report` read this document. Pure.
"""
from __future__ import annotations

from .compare import format_many, result_json
from .evaluate import EvalResult
from .serving import ServingFigures, format_serving
from .tasks import TaskReport, format_tasks

_SHARED = ("model", "base")


def suite_json(model_paths: list[str], base: str, text: list[EvalResult] | None = None,
               answers: list[EvalResult] | None = None, tasks: TaskReport | None = None,
               serving: tuple[ServingFigures | None, list[ServingFigures]] | None = None) -> dict:
    rows = [result_json(r) for r in text] if text else [{"model": str(p), "base": str(base)} for p in model_paths]
    head: dict = {"base": str(base)}
    if text:
        r0 = text[0]
        head.update(text=r0.text, ctx=r0.ctx, windows=r0.windows, tokens=r0.metrics["tokens"])
    if answers:
        head["answers_prompts"] = answers[0].text.removeprefix("answers:")
        for row, r in zip(rows, answers):
            row["answers"] = {k: v for k, v in result_json(r).items() if k not in _SHARED}
    if tasks is not None:
        head["tasks_source"] = tasks.source
        head["base_tasks"] = tasks.base_scores
        for row, p in zip(rows, model_paths):
            row["tasks"] = tasks.results[str(p)]
    if serving is not None:
        base_fig, cand_figs = serving
        if base_fig is not None:
            head["base_serving"] = base_fig.to_json()
        for row, f in zip(rows, cand_figs):
            row["serving"] = f.to_json()
    return {**(rows[0] if len(rows) == 1 else {}), **head, "results": rows}


def format_suite(text: list[EvalResult] | None = None, answers: list[EvalResult] | None = None,
                 tasks: TaskReport | None = None,
                 serving: tuple[ServingFigures | None, list[ServingFigures]] | None = None) -> str:
    parts = []
    if text:
        parts.append(format_many(text))
    if answers:
        a0 = answers[0]
        parts.append(format_many(answers, title=(
            f"KLD on the base's own answers: base {a0.base}, prompts {a0.text.removeprefix('answers:')} "
            f"({a0.windows} answers, {a0.metrics['tokens']} answer tokens, at most {a0.ctx} each; "
            "[95% CI, answers resampled])")))
    if tasks is not None:
        parts.append(format_tasks(tasks))
    if serving is not None:
        parts.append(format_serving(*serving))
    return "\n\n".join(parts)
