"""One self-contained HTML page and a Markdown file from eval (and inspect) results.

Inputs: `lowbit eval --json` files (one or more, any number of candidates each), optionally
`lowbit inspect --json` files for per-layer error, and each candidate's lowbit.json (read from its
directory when it exists) for recipe, timings and peak memory.

Sections: summary table with 95% intervals, KLD-vs-size Pareto front, KLD histograms, per-layer
error, timings. The HTML embeds its figures as base64 PNGs (no external resource at all); the
Markdown links the same PNGs written next to it.

Pure: `pareto_front`, `layer_errors`, `render_html`, `render_markdown`; the plots return PNG bytes.
"""
from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ..errors import LowbitError
from .gate import _num, results_list
from .inspect import layer_of

log = logging.getLogger(__name__)


@dataclass
class Candidate:
    model: str
    metrics: dict
    size_bytes: int | None = None
    recipe: dict | None = None
    timings: dict | None = None
    peak_memory: dict | None = None
    tensors: list[dict] | None = None  # inspect rows

    @property
    def name(self) -> str:
        return Path(self.model.rstrip("/")).name or self.model

    @property
    def kld(self) -> float | None:
        return _num(self.metrics.get("kld_mean"))


# -- pure analysis ------------------------------------------------------------------------------
def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points no other point beats on both size and error (lower is better for both),
    ordered by size."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], math.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def layer_errors(tensors: list[dict], metric: str = "rel_rms") -> dict[int, float]:
    """Mean `metric` per decoder layer over the tensors that changed (rel_rms > 0)."""
    acc: dict[int, list[float]] = {}
    for t in tensors:
        layer = layer_of(t["name"])
        v = _num(t.get(metric))
        if layer is None or v is None or not (_num(t.get("rel_rms")) or 0) > 0:
            continue
        acc.setdefault(layer, []).append(v)
    return {k: sum(v) / len(v) for k, v in sorted(acc.items())}


# -- loading (I/O) ------------------------------------------------------------------------------
def load_candidates(eval_files: list[Path], inspect_files: list[Path] = ()) -> tuple[dict, list[Candidate]]:
    """Candidates from eval JSONs, with lowbit.json and inspect rows attached where found."""
    from ..model.source import model_size_bytes
    context: dict = {}
    cands: list[Candidate] = []
    for f in eval_files:
        try:
            doc = json.loads(Path(f).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise LowbitError(f"cannot read eval results {f}: {e}") from None
        for r in results_list(doc):
            for k in ("base", "text", "ctx", "windows", "tokens"):
                context.setdefault(k, r.get(k))
            c = Candidate(str(r.get("model", "?")), r, _num(r.get("size_bytes")))
            d = Path(c.model).expanduser()
            if d.is_dir():
                if c.size_bytes is None:
                    c.size_bytes = model_size_bytes(d) or None
                meta = d / "lowbit.json"
                if meta.is_file():
                    m = json.loads(meta.read_text())
                    c.recipe, c.timings, c.peak_memory = m.get("recipe"), m.get("timings"), m.get("peak_memory")
            cands.append(c)
    if not cands:
        raise LowbitError("no candidates in the given eval results")
    inspections = [json.loads(Path(f).read_text()) for f in inspect_files]
    for ins in inspections:
        match = _match(ins.get("model", ""), cands)
        if match is None:
            log.warning("inspect results for %s match no evaluated candidate; skipped", ins.get("model"))
        else:
            match.tensors = ins.get("tensors", [])
    return context, cands


def _match(model: str, cands: list[Candidate]) -> Candidate | None:
    def norm(p: str) -> str:
        q = Path(p).expanduser()
        return str(q.resolve()) if q.exists() else p
    for c in cands:
        if norm(c.model) == norm(model):
            return c
    by_name = [c for c in cands if c.name == Path(model.rstrip("/")).name]
    return by_name[0] if len(by_name) == 1 else None


# -- plots (PNG bytes) --------------------------------------------------------------------------
def _figure(w: float = 7.0, h: float = 4.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(111)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _color(c: Candidate, cands: list[Candidate]) -> str:
    """One colour per candidate across all figures."""
    return f"C{cands.index(c) % 10}"


def plot_pareto(cands: list[Candidate]) -> bytes | None:
    pts = [(c, c.size_bytes / 2**20, c.kld) for c in cands if c.size_bytes and c.kld is not None and c.kld > 0]
    if not pts:
        return None
    fig, ax = _figure()
    front = set(pareto_front([(s, k) for _, s, k in pts]))
    for i, (c, s, k) in enumerate(pts):
        lo, hi = _num(c.metrics.get("kld_mean_ci_lo")), _num(c.metrics.get("kld_mean_ci_hi"))
        yerr = [[k - lo], [hi - k]] if lo is not None and hi is not None else None
        ax.errorbar([s], [k], yerr=yerr, fmt="o", color="C3" if i in front else "C0", capsize=3)
        ax.annotate(c.name, (s, k), textcoords="offset points", xytext=(5, 5), fontsize=8)
    fr = sorted((pts[i][1], pts[i][2]) for i in front)
    ax.step([p[0] for p in fr], [p[1] for p in fr], where="post", color="C3", alpha=0.6, label="Pareto front")
    ax.set_xlabel("size on disk (MiB)")
    ax.set_ylabel("mean KLD to base (nats)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title("quality vs size (lower left is better; bars: 95% CI)")
    return _png(fig)


def plot_histograms(cands: list[Candidate]) -> bytes | None:
    hs = [(c, c.metrics.get("kld_histogram")) for c in cands]
    hs = [(c, h) for c, h in hs if h and sum(h.get("counts", [])) > 0]
    if not hs:
        return None
    fig, ax = _figure()
    used = [i for _, h in hs for i, n in enumerate(h["counts"]) if n]
    lo, hi = min(used), min(max(used) + 2, len(hs[0][1]["edges"]))  # trim empty bins at both ends
    for c, h in hs:
        edges, counts = h["edges"][lo:hi], h["counts"][lo:hi]
        total = sum(h["counts"])
        lefts = [max(e, h["edges"][1] / 10) for e in edges]  # the first bin [0, 1e-6) drawn at 1e-7
        ax.step(lefts, [n / total for n in counts], where="post", label=c.name, color=_color(c, cands))
    ax.set_xscale("log")
    ax.set_xlabel("per-token KLD (nats, bin lower edge)")
    ax.set_ylabel("fraction of tokens")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("distribution of per-token KLD")
    return _png(fig)


def plot_layers(cands: list[Candidate]) -> bytes | None:
    series = [(c, layer_errors(c.tensors)) for c in cands if c.tensors]
    series = [(c, s) for c, s in series if s]
    if not series:
        return None
    fig, ax = _figure()
    from matplotlib.ticker import MaxNLocator
    for c, s in series:
        ax.plot(list(s), list(s.values()), marker="o", label=c.name, color=_color(c, cands))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("mean relative RMS error of quantized tensors")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("per-layer weight error (from lowbit inspect)")
    return _png(fig)


FIGURES = {"pareto": ("KLD vs size", plot_pareto), "kld_hist": ("KLD histograms", plot_histograms),
           "layers": ("Per-layer error", plot_layers)}


def make_figures(cands: list[Candidate]) -> dict[str, bytes]:
    out = {}
    for key, (_, fn) in FIGURES.items():
        png = fn(cands)
        if png:
            out[key] = png
    return out


# -- tables (pure) ------------------------------------------------------------------------------
def _ci(m: dict, k: str, fmt: str) -> str:
    v = _num(m.get(k))
    if v is None:
        return "-"
    lo, hi = _num(m.get(f"{k}_ci_lo")), _num(m.get(f"{k}_ci_hi"))
    return fmt.format(v) + ("" if lo is None or hi is None else f" [{fmt.format(lo)}, {fmt.format(hi)}]")


def _mib(b) -> str:
    from .size import format_bytes
    return format_bytes(b)


def summary_rows(cands: list[Candidate]) -> tuple[list[str], list[list[str]]]:
    pts = [(c.size_bytes, c.kld) for c in cands]
    ok = [i for i, (s, k) in enumerate(pts) if s is not None and k is not None]
    front = {ok[j] for j in pareto_front([pts[i] for i in ok])}
    head = ["candidate", "size", "KLD mean [95% CI]", "KLD p99", "top-1 [95% CI]", "ppl [95% CI]", "ppl +%", "Pareto"]
    rows = []
    for i, c in enumerate(cands):
        m = c.metrics
        inc = _num(m.get("ppl_increase_pct"))
        if inc is None and _num(m.get("ppl")) and _num(m.get("ppl_base")):
            inc = 100 * (m["ppl"] / m["ppl_base"] - 1)
        rows.append([c.name, _mib(c.size_bytes), _ci(m, "kld_mean", "{:.5f}"),
                     "-" if _num(m.get("kld_p99")) is None else f"{m['kld_p99']:.4f}",
                     _ci(m, "top1", "{:.4f}"), _ci(m, "ppl", "{:.3f}"),
                     "-" if inc is None else f"{inc:+.2f}%", "yes" if i in front else ""])
    return head, rows


def timing_rows(cands: list[Candidate]) -> tuple[list[str], list[list[str]]]:
    head = ["candidate", "method", "bits", "group", "calibration s", "quantize s", "export s", "total s", "peak RSS"]
    rows = []
    for c in cands:
        if not c.timings and not c.recipe:
            continue
        r, t, p = c.recipe or {}, c.timings or {}, c.peak_memory or {}
        scheme = r.get("scheme") or {}
        f = lambda k: "-" if _num(t.get(k)) is None else f"{t[k]:.1f}"  # noqa: E731
        rows.append([c.name, str(r.get("method", "-")), str(scheme.get("bits", r.get("bits", "-"))),
                     str(scheme.get("group_size", r.get("group_size", "-"))), f("calibration_s"), f("quantize_s"),
                     f("export_s"), f("total_s"), _mib(_num(p.get("rss_bytes")))])
    return head, rows


def answers_rows(cands: list[Candidate]) -> tuple[list[str], list[list[str]]]:
    """KLD on the base's own answers (lowbit eval --answers), where measured."""
    head = ["candidate", "answers", "tokens", "KLD mean [95% CI]", "KLD p99", "top-1 [95% CI]", "answer ppl +%"]
    rows = []
    for c in cands:
        a = c.metrics.get("answers")
        if not isinstance(a, dict):
            continue
        inc = _num(a.get("ppl_increase_pct"))
        rows.append([c.name, str(a.get("answers", a.get("windows", "-"))), str(a.get("tokens", "-")),
                     _ci(a, "kld_mean", "{:.5f}"), "-" if _num(a.get("kld_p99")) is None else f"{a['kld_p99']:.4f}",
                     _ci(a, "top1", "{:.4f}"), "-" if inc is None else f"{inc:+.2f}%"])
    return head, rows


def task_rows(cands: list[Candidate]) -> tuple[list[str], list[list[str]]]:
    """Per candidate and task: base score, score and drop with 95% intervals (lowbit eval --tasks)."""
    head = ["candidate", "task", "n", "metric", "base", "score [95% CI]", "drop, pts [95% CI]"]
    rows = []
    pts = lambda x: "-" if _num(x) is None else f"{100 * x:+.1f}"  # noqa: E731
    for c in cands:
        for t, r in sorted((c.metrics.get("tasks") or {}).items()):
            if not isinstance(r, dict):
                continue
            rows.append([c.name, t, str(r.get("n", "-")), str(r.get("metric", "-")),
                         "-" if _num(r.get("base")) is None else f"{r['base']:.3f}", _ci(r, "score", "{:.3f}"),
                         f"{pts(r.get('drop'))} [{pts(r.get('drop_ci_lo'))}, {pts(r.get('drop_ci_hi'))}]"])
    return head, rows


def serving_rows(cands: list[Candidate]) -> tuple[list[str], list[list[str]]]:
    """Serving figures (lowbit eval --serving) of the base and every candidate."""
    head = ["model", "runtime", "device", "prefill tok/s", "decode tok/s", "p95 ms/token", "peak memory"]
    rows = []
    base = next((c.metrics["base_serving"] for c in cands if isinstance(c.metrics.get("base_serving"), dict)), None)
    entries = ([("base", base)] if base else []) + [(c.name, c.metrics.get("serving")) for c in cands]
    f = lambda v, fmt: "-" if _num(v) is None else fmt.format(v)  # noqa: E731
    for name, sv in entries:
        if not isinstance(sv, dict):
            continue
        rows.append([name, str(sv.get("runtime", "-")), str(sv.get("device", "-")),
                     f(sv.get("prefill_tokens_per_s"), "{:.1f}"), f(sv.get("decode_tokens_per_s"), "{:.1f}"),
                     f(sv.get("p95_ms"), "{:.2f}"), _mib(_num(sv.get("memory_bytes")))])
    return (head, rows) if any(r[0] != "base" for r in rows) else (head, [])


def worst_tensor_rows(cands: list[Candidate], n: int = 5) -> tuple[list[str], list[list[str]]]:
    head = ["candidate", "tensor", "cos", "rel_rms", "max_abs", "outliers"]
    rows = []
    for c in cands:
        ts = sorted((t for t in c.tensors or [] if _num(t.get("rel_rms"))), key=lambda t: -t["rel_rms"])[:n]
        rows += [[c.name, t["name"], f"{t['cos']:.6f}", f"{t['rel_rms']:.5f}", f"{t['max_abs']:.4g}",
                  str(t.get("outliers", "-"))] for t in ts]
    return head, rows


# -- rendering (pure) ---------------------------------------------------------------------------
_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1000px;margin:2em auto;
padding:0 1em;color:#222}table{border-collapse:collapse;margin:1em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right;white-space:nowrap}
th:first-child,td:first-child{text-align:left}
th{background:#f3f3f3}img{max-width:100%;height:auto;display:block;margin:1em 0}
.meta{color:#555;font-size:.9em}"""


def _html_table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(esc, head)) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return "\n".join(lines + ["| " + " | ".join(map(esc, r)) + " |" for r in rows])


def _context_line(ctx: dict) -> str:
    return (f"base: {ctx.get('base')} · text: {ctx.get('text')} · ctx {ctx.get('ctx')} · "
            f"{ctx.get('windows')} windows · {ctx.get('tokens')} scored tokens · "
            "intervals: 95%, bootstrap over windows")


def _sections(cands: list[Candidate]) -> list[tuple[str, tuple[list[str], list[list[str]]] | None, str | None]]:
    """(title, table, figure key) in page order."""
    secs = [("Summary", summary_rows(cands), None), ("KLD vs size", None, "pareto"),
            ("KLD histograms", None, "kld_hist"), ("Per-layer error", None, "layers")]
    for title, fn in (("KLD on the base's own answers", answers_rows), ("Tasks", task_rows),
                      ("Serving", serving_rows)):
        table = fn(cands)
        if table[1]:
            secs.append((title, table, None))
    wt = worst_tensor_rows(cands)
    if wt[1]:
        secs.append(("Worst tensors", wt, None))
    tr = timing_rows(cands)
    if tr[1]:
        secs.append(("Timings", tr, None))
    return secs


def render_html(title: str, ctx: dict, cands: list[Candidate], images: dict[str, bytes], generated: str) -> str:
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>",
             f"<p class='meta'>{html.escape(_context_line(ctx))}<br>generated {html.escape(generated)}</p>"]
    for sec_title, table, fig in _sections(cands):
        if fig and fig not in images:
            continue
        parts.append(f"<h2>{html.escape(sec_title)}</h2>")
        if table:
            parts.append(_html_table(*table))
        if fig:
            b64 = base64.b64encode(images[fig]).decode()
            parts.append(f"<img id='fig-{fig}' alt='{html.escape(sec_title)}' src='data:image/png;base64,{b64}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def render_markdown(title: str, ctx: dict, cands: list[Candidate], image_paths: dict[str, str], generated: str) -> str:
    parts = [f"# {title}", "", _context_line(ctx) + f"  \ngenerated {generated}", ""]
    for sec_title, table, fig in _sections(cands):
        if fig and fig not in image_paths:
            continue
        parts += [f"## {sec_title}", ""]
        if table:
            parts += [_md_table(*table), ""]
        if fig:
            parts += [f"![{sec_title}]({image_paths[fig]})", ""]
    return "\n".join(parts)


# -- writing (I/O) ------------------------------------------------------------------------------
def write_report(out: Path, eval_files: list[Path], inspect_files: list[Path] = (),
                 title: str = "lowbit evaluation report", run_inspect: bool = False) -> tuple[Path, Path]:
    """Write `<out>.html` (self-contained), `<out>.md` and the PNGs it links in `<out>_files/`.

    With `run_inspect`, candidates that have a lowbit.json and no inspect file are inspected
    against their recorded source (tensor by tensor) for the per-layer section.
    """
    out = Path(out)
    if out.suffix in (".html", ".md"):
        out = out.with_suffix("")
    ctx, cands = load_candidates([Path(f) for f in eval_files], [Path(f) for f in inspect_files])
    if run_inspect:
        from .inspect import iter_inspect
        for c in cands:
            if c.tensors is None and c.recipe is not None:
                c.tensors = [e.to_json() for e in iter_inspect(c.model)]
    images = make_figures(cands)
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out.parent.mkdir(parents=True, exist_ok=True)
    files_dir = out.with_name(out.name + "_files")
    files_dir.mkdir(exist_ok=True)
    paths = {}
    for key, png in images.items():
        (files_dir / f"{key}.png").write_bytes(png)
        paths[key] = f"{files_dir.name}/{key}.png"
    html_path, md_path = out.with_suffix(".html"), out.with_suffix(".md")
    _write(html_path, render_html(title, ctx, cands, images, generated))
    _write(md_path, render_markdown(title, ctx, cands, paths, generated))
    return html_path, md_path


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
