"""Two quantized models of one base, side by side (seed 001's compare_awq_slicing.py).

`lowbit compare --heuristic-path A --standard-path B` answers "did A's extra step (DH-AWQ's
rounding flips, say) help, and where did it change the weights?":

* outputs, on the same held-out windows: perplexity of base, A and B; KL(base ‖ A), KL(base ‖ B)
  with 95% intervals and the paired interval of their difference (windows resampled together);
  KL(A ‖ B), KL(B ‖ A) and the top-1 agreement between A and B. The base's logits come from the
  evaluation cache (`cache`), A and B run side by side on each batch.
* weights, per linear (from the checkpoints, no forward pass): the fraction of integer codes that
  differ (pack-quantized checkpoints), the fraction of groups whose scale differs, and
  ‖W_A − W_B‖ / ‖W_B‖ of the dequantized weights; aggregated per decoder layer.
* what each method logged in its lowbit.json ``layer_stats``: DH-AWQ's flips and outlier share
  (``rounding``), per linear and per layer.

Pure: `weight_diff`, `rounding_stats`, `paired_mean_diff_ci`, `format_pair`; `plot_pair` returns PNG bytes.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..data import eval_windows, load_text
from ..errors import LowbitError
from ..model.source import model_size_bytes, resolve_model_dir
from .compare import base_logits_source
from .evaluate import _refuse_calibration_overlap, load_causal_lm
from .inspect import CheckpointReader, layer_of, recorded_source
from .metrics import TokenStats, summarize, token_stats
from .tasks import mean_ci

log = logging.getLogger(__name__)


# -- weights (pure) -----------------------------------------------------------------------------
def weight_diff(W_a: torch.Tensor, W_b: torch.Tensor, codes_a: torch.Tensor | None = None,
                codes_b: torch.Tensor | None = None, scale_a: torch.Tensor | None = None,
                scale_b: torch.Tensor | None = None) -> dict[str, float | None]:
    """How far two reconstructions of one linear are apart.

    Shapes: W_a, W_b [out, in] float; codes_* [out, in] int or None; scale_* [out, G] or None.
    rel_diff = ‖W_a − W_b‖ / ‖W_b‖; code_diff = share of codes that differ; scale_diff = share of
    group scales that differ (None where the checkpoints hold no codes/scales).
    """
    if W_a.shape != W_b.shape:
        raise LowbitError(f"shape mismatch {tuple(W_a.shape)} vs {tuple(W_b.shape)}; are A and B of one base?")
    d = (W_a.double() - W_b.double())
    nb = float(W_b.double().norm())
    out: dict[str, float | None] = {
        "rel_diff": float(d.norm()) / nb if nb > 0 else (0.0 if float(d.norm()) == 0 else math.inf),
        "max_abs_diff": float(d.abs().max()) if d.numel() else 0.0,
        "code_diff": None, "scale_diff": None}
    if codes_a is not None and codes_b is not None and codes_a.shape == codes_b.shape:
        out["code_diff"] = float((codes_a != codes_b).double().mean())
    if scale_a is not None and scale_b is not None and scale_a.shape == scale_b.shape:
        out["scale_diff"] = float((scale_a != scale_b).double().mean())
    return out


def rounding_stats(meta: dict | None) -> dict[str, dict[str, float]]:
    """Per linear (``model.layers.<i>.<name>.weight``): flips, outlier_pct, knee, b_before, b_after,
    from a lowbit.json's ``layer_stats.<layer>.rounding`` (what DH-AWQ logs); {} when absent."""
    out = {}
    for layer, st in ((meta or {}).get("layer_stats") or {}).items():
        try:
            i = int(layer)
        except ValueError:
            continue
        for name, r in ((st or {}).get("rounding") or {}).items():
            if isinstance(r, dict):
                out[f"model.layers.{i}.{name}.weight"] = {k: float(v) for k, v in r.items()
                                                          if isinstance(v, (int, float))}
    return out


@dataclass
class LinearDiff:
    name: str
    layer: int | None
    numel: int
    rel_diff: float
    max_abs_diff: float
    code_diff: float | None
    scale_diff: float | None
    flips_a: float | None = None
    outlier_pct_a: float | None = None
    flips_b: float | None = None
    outlier_pct_b: float | None = None


def compare_weights(a: str, b: str) -> list[LinearDiff]:
    """`weight_diff` of every quantized (or changed float) linear present in both checkpoints."""
    ra, rb = CheckpointReader(resolve_model_dir(a)), CheckpointReader(resolve_model_dir(b))
    sa, sb = (rounding_stats(_meta(resolve_model_dir(p))) for p in (a, b))
    names_b = set(rb.names())
    rows = []
    for name in ra.names():
        if name not in names_b or layer_of(name) is None or not name.endswith(".weight"):
            continue
        if not ra.is_float(name) or not rb.is_float(name):
            continue
        W_a, W_b = ra.get(name), rb.get(name)
        if W_a.dim() != 2:
            continue  # norms: AWQ folds scales into them, they are not what differs in rounding
        d = weight_diff(W_a, W_b, ra.codes(name), rb.codes(name), ra.scale(name), rb.scale(name))
        fa, fb = sa.get(name, {}), sb.get(name, {})
        rows.append(LinearDiff(name, layer_of(name), W_a.numel(), d["rel_diff"], d["max_abs_diff"], d["code_diff"],
                               d["scale_diff"], fa.get("flips"), fa.get("outlier_pct"), fb.get("flips"),
                               fb.get("outlier_pct")))
    if not rows:
        raise LowbitError(f"{a} and {b} share no decoder linear weights to compare")
    return rows


def per_layer(rows: list[LinearDiff]) -> list[dict]:
    """Per decoder layer: element-weighted code/scale difference, RMS-combined relative difference,
    total flips and mean outlier share of A and B."""
    out = []
    for layer in sorted({r.layer for r in rows if r.layer is not None}):
        rs = [r for r in rows if r.layer == layer]

        def wmean(key):
            vals = [(getattr(r, key), r.numel) for r in rs if getattr(r, key) is not None]
            return sum(v * k for v, k in vals) / sum(k for _, k in vals) if vals else None

        def total(key):
            vals = [getattr(r, key) for r in rs if getattr(r, key) is not None]
            return sum(vals) if vals else None

        def mean(key):
            vals = [getattr(r, key) for r in rs if getattr(r, key) is not None]
            return sum(vals) / len(vals) if vals else None

        out.append({"layer": layer, "linears": len(rs), "numel": sum(r.numel for r in rs), "code_diff": wmean("code_diff"),
                    "scale_diff": wmean("scale_diff"), "rel_diff": _rms_rel(rs), "flips_a": total("flips_a"), "flips_b": total("flips_b"),
                    "outlier_pct_a": mean("outlier_pct_a"), "outlier_pct_b": mean("outlier_pct_b")})
    return out


def _rms_rel(rs: list[LinearDiff]) -> float:
    """sqrt(Σ rel² n / Σ n): a size-weighted RMS of the per-linear relative differences."""
    n = sum(r.numel for r in rs)
    return math.sqrt(sum(r.rel_diff ** 2 * r.numel for r in rs) / n) if n else 0.0


def _meta(model_dir: Path) -> dict | None:
    f = Path(model_dir) / "lowbit.json"
    return json.loads(f.read_text()) if f.is_file() else None


# -- outputs ------------------------------------------------------------------------------------
def paired_mean_diff_ci(a: torch.Tensor, b: torch.Tensor, n_resamples: int = 1000,
                        seed: int = 0) -> tuple[float, float, float]:
    """Mean of a − b and its 95% interval, units (windows) resampled together. Shapes: a, b [n]."""
    d = a.double() - b.double()
    lo, hi = mean_ci(d, n_resamples, seed=seed)
    return float(d.mean()), lo, hi


@dataclass
class PairReport:
    a: str
    b: str
    base: str | None
    text: str | None = None
    ctx: int | None = None
    windows: int = 0
    models: dict[str, dict] = field(default_factory=dict)   # "a"/"b" -> figures vs the base
    between: dict[str, float] = field(default_factory=dict)  # A vs B
    layers: list[dict] = field(default_factory=list)
    linears: list[LinearDiff] = field(default_factory=list)

    def to_json(self) -> dict:
        d = asdict(self)
        d["linears"] = [asdict(r) for r in self.linears]
        return d


@torch.inference_mode()
def compare_outputs(a: str, b: str, base: str, text: str = "moby-dick", ctx: int = 512, n_windows: int | None = 40,
                    device: str = "cpu", batch_size: int = 2, progress: bool = True, use_cache: bool = True,
                    cache_root: Path | None = None, n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """Output figures of A and B against the base and each other (see the module docstring)."""
    from transformers import AutoTokenizer
    base_dir = resolve_model_dir(base)
    src = load_text(text, split="evaluation")
    for p in (a, b):
        _refuse_calibration_overlap(resolve_model_dir(p), src.sha256, src.name)
    tok = AutoTokenizer.from_pretrained(base_dir)
    windows = eval_windows(tok, src, ctx, n_windows)
    if n_windows is not None and windows.shape[0] < n_windows:
        log.info("%s has %d windows of %d tokens; scoring all of them (asked for %d)", src.name,
                 windows.shape[0], ctx, n_windows)
    base_logits = base_logits_source(base, base_dir, src, ctx, windows, device, batch_size, progress, use_cache,
                                     cache_root)
    ma, _ = load_causal_lm(str(a), device)
    mb, _ = load_causal_lm(str(b), device)
    parts: dict[str, list[TokenStats]] = {"a": [], "b": [], "ab": [], "ba": []}
    for start in tqdm(range(0, windows.shape[0], batch_size), desc="A vs B", unit="batch", disable=not progress):
        ids = windows[start:start + batch_size].to(device)
        lb = base_logits(start, ids)
        la, lbb = ma(input_ids=ids).logits.float(), mb(input_ids=ids).logits.float()
        if not lb.shape == la.shape == lbb.shape:
            raise LowbitError("A, B and the base must share one tokenizer and vocabulary")
        for i in range(ids.shape[0]):
            t = ids[i, 1:]
            parts["a"].append(token_stats(lb[i, :-1], la[i, :-1], t))
            parts["b"].append(token_stats(lb[i, :-1], lbb[i, :-1], t))
            parts["ab"].append(token_stats(la[i, :-1], lbb[i, :-1], t))
            parts["ba"].append(token_stats(lbb[i, :-1], la[i, :-1], t))
    del ma, mb
    st = {k: TokenStats.concat(v) for k, v in parts.items()}
    n = int(windows.shape[0])
    per_window = lambda t: t.double().reshape(n, ctx - 1).mean(1)  # noqa: E731
    models = {}
    for key, path in (("a", a), ("b", b)):
        m = summarize(st[key])
        m["kld_mean_ci_lo"], m["kld_mean_ci_hi"] = mean_ci(per_window(st[key].kld), n_bootstrap, seed=seed)
        m["ppl_increase_pct"] = 100 * (m["ppl"] / m["ppl_base"] - 1)
        m["size_bytes"] = model_size_bytes(resolve_model_dir(path))
        models[key] = m
    diff, lo, hi = paired_mean_diff_ci(per_window(st["a"].kld), per_window(st["b"].kld), n_bootstrap, seed)
    nll = lambda k: per_window(st[k].nll_cand)  # noqa: E731
    dppl, dlo, dhi = paired_mean_diff_ci(nll("a"), nll("b"), n_bootstrap, seed)
    between = {"kld_a_b": float(st["ab"].kld.double().mean()), "kld_b_a": float(st["ba"].kld.double().mean()),
               "kld_a_b_p99": float(torch.quantile(st["ab"].kld.double(), 0.99)),
               "top1_a_b": float(st["ab"].same_top1.double().mean()),
               "kld_diff": diff, "kld_diff_ci_lo": lo, "kld_diff_ci_hi": hi,
               "nll_diff": dppl, "nll_diff_ci_lo": dlo, "nll_diff_ci_hi": dhi}
    return {"text": src.name, "ctx": ctx, "windows": n, "models": models, "between": between}


def compare_pair(a: str, b: str, base: str | None = None, n_windows: int | None = 40, **kw) -> PairReport:
    """Weights always; outputs too unless `n_windows` is 0. `base` defaults to A's recorded source."""
    if base is None and n_windows != 0:
        base = recorded_source(resolve_model_dir(a))
    linears = compare_weights(a, b)
    rep = PairReport(str(a), str(b), None if base is None else str(base), layers=per_layer(linears), linears=linears)
    if n_windows != 0:
        out = compare_outputs(a, b, base, n_windows=n_windows, **kw)
        rep.text, rep.ctx, rep.windows, rep.models, rep.between = (out["text"], out["ctx"], out["windows"],
                                                                    out["models"], out["between"])
    return rep


# -- presentation -------------------------------------------------------------------------------
def _f(v, fmt: str) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else fmt.format(v)


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = lambda v: "  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(v, widths)))  # noqa: E731
    return [line(head), "-" * len(line(head)), *map(line, rows)]


def format_pair(rep: PairReport) -> str:
    out = [f"A (heuristic): {rep.a}", f"B (standard):  {rep.b}"]
    if rep.models:
        ma, mb, bt = rep.models["a"], rep.models["b"], rep.between
        out += ["", f"outputs vs base {rep.base}: {rep.text}, {rep.windows} windows × {rep.ctx - 1} scored tokens "
                    "(95% CI, windows resampled)"]
        rows = [["base", "-", _f(ma["ppl_base"], "{:.3f}"), "-", "-", "-", "-"]]
        for name, m in (("A", ma), ("B", mb)):
            rows.append([name, _f(m["size_bytes"] / 2**20, "{:.1f}MiB"), _f(m["ppl"], "{:.3f}"),
                         _f(m["ppl_increase_pct"], "{:+.2f}%"),
                         f"{m['kld_mean']:.5f} [{m['kld_mean_ci_lo']:.5f}, {m['kld_mean_ci_hi']:.5f}]",
                         _f(m["kld_p99"], "{:.4f}"), _f(m["top1"], "{:.4f}")])
        out += _table(["model", "size", "ppl", "ppl +%", "KLD to base [95% CI]", "KLD p99", "top-1"], rows)
        verdict = ("A is closer to the base" if bt["kld_diff_ci_hi"] < 0 else
                   "B is closer to the base" if bt["kld_diff_ci_lo"] > 0 else "no significant difference")
        out += ["",
                f"KLD(base‖A) − KLD(base‖B): {bt['kld_diff']:+.5f} [{bt['kld_diff_ci_lo']:+.5f}, "
                f"{bt['kld_diff_ci_hi']:+.5f}]  ({verdict})",
                f"KL(A‖B) {bt['kld_a_b']:.5f} (p99 {bt['kld_a_b_p99']:.4f}), KL(B‖A) {bt['kld_b_a']:.5f}, "
                f"top-1 agreement A/B {bt['top1_a_b']:.4f}"]
    has_flips = any(r["flips_a"] is not None or r["flips_b"] is not None for r in rep.layers)
    head = ["layer", "codes ≠", "scales ≠", "‖A−B‖/‖B‖"] + (["flips A", "outl% A", "flips B", "outl% B"]
                                                           if has_flips else [])
    rows = []
    for r in rep.layers:
        row = [str(r["layer"]), _f(r["code_diff"], "{:.2%}"), _f(r["scale_diff"], "{:.2%}"), f"{r['rel_diff']:.5f}"]
        if has_flips:
            row += [_f(r["flips_a"], "{:.0f}"), _f(r["outlier_pct_a"], "{:.2f}"), _f(r["flips_b"], "{:.0f}"),
                    _f(r["outlier_pct_b"], "{:.2f}")]
        rows.append(row)
    tot = sum(r.numel for r in rep.linears)
    codes = [r for r in rep.linears if r.code_diff is not None]
    overall = (sum(r.code_diff * r.numel for r in codes) / sum(r.numel for r in codes)) if codes else None
    out += ["", f"weights: {len(rep.linears)} linears, {tot:,} weights; codes that differ overall: "
                f"{_f(overall, '{:.3%}')}; relative difference (size-weighted RMS): {_rms_rel(rep.linears):.5f}"]
    out += _table(head, rows)
    return "\n".join(out)


def plot_pair(rep: PairReport) -> bytes:
    """Per-layer differences (codes, relative weight difference), flips and outliers, and the output
    figures with their intervals, as one PNG."""
    import io
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    panels = 3 if rep.models else 2
    fig = Figure(figsize=(7.5, 3.0 * panels), dpi=100)
    FigureCanvasAgg(fig)
    axs = fig.subplots(panels, 1)
    from matplotlib.ticker import MaxNLocator
    for ax in axs[:2]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    layers = [r["layer"] for r in rep.layers]
    ax = axs[0]
    ax.bar(layers, [100 * (r["code_diff"] or 0) for r in rep.layers], color="C0", label="codes that differ (%)")
    if any(r["scale_diff"] for r in rep.layers):
        ax.plot(layers, [100 * (r["scale_diff"] or 0) for r in rep.layers], color="C7", ls="--",
                label="group scales that differ (%)")
    ax.set_ylabel("codes ≠ (%)")
    ax2 = ax.twinx()
    ax2.plot(layers, [r["rel_diff"] for r in rep.layers], color="C3", marker="o", label="‖A−B‖/‖B‖")
    ax2.set_ylabel("‖A−B‖/‖B‖")
    ax.set_xlabel("decoder layer")
    ax.set_title("where A and B differ")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper right")
    ax = axs[1]
    w = 0.4
    fa = [r["flips_a"] or 0 for r in rep.layers]
    fb = [r["flips_b"] or 0 for r in rep.layers]
    ax.bar([x - w / 2 for x in layers], fa, w, color="C1", label="flips A")
    ax.bar([x + w / 2 for x in layers], fb, w, color="C2", label="flips B")
    ax.set_ylabel("rounding flips")
    ax.set_xlabel("decoder layer")
    oa = [r["outlier_pct_a"] for r in rep.layers]
    if any(v is not None for v in oa):
        ax3 = ax.twinx()
        ax3.plot(layers, [v if v is not None else float("nan") for v in oa], color="C4", marker="s",
                 label="outliers A (%)")
        ax3.set_ylabel("outlier channels (%)")
        ax3.legend(fontsize=8, loc="upper left")
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title("flips and outliers (lowbit.json layer_stats)")
    if rep.models:
        ax = axs[2]
        names = ["A", "B"]
        ms = [rep.models["a"], rep.models["b"]]
        k = [m["kld_mean"] for m in ms]
        err = [[m["kld_mean"] - m["kld_mean_ci_lo"] for m in ms], [m["kld_mean_ci_hi"] - m["kld_mean"] for m in ms]]
        ax.bar(names, k, yerr=err, capsize=6, color=["C1", "C2"])
        for i, m in enumerate(ms):
            ax.annotate(f"ppl {m['ppl']:.3f}", (i, k[i]), textcoords="offset points", xytext=(0, 8), ha="center",
                        fontsize=8)
        ax.set_ylabel("mean KLD to base (nats)")
        ax.set_ylim(0, 1.25 * max(m["kld_mean_ci_hi"] for m in ms))
        bt = rep.between
        ax.set_title(f"KLD(A)−KLD(B) = {bt['kld_diff']:+.5f} [{bt['kld_diff_ci_lo']:+.5f}, "
                     f"{bt['kld_diff_ci_hi']:+.5f}];  KL(A‖B) = {bt['kld_a_b']:.5f}", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
