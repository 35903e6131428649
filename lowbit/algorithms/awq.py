"""AWQ (Lin et al. 2023), as AutoAWQ runs it: per-input-channel scales searched against the
output of the block each balance group feeds, folded into the op before the group, then a
clipping-range search per linear, then nearest rounding.

Plan, then apply: a search returns scales (plain data); `fold` applies them to a
`ScaledLayer`, a re-parametrisation of the layer's float weights that computes the same
function; codes are fitted on that. dh_awq and awq_joint reuse every piece and change the
rounding (and, for awq-joint, the search).

Names: W float [out, in]; W_q codes; W_r reconstruction; X activations [tokens, in];
H = E[x xᵀ] [in, in]; s scales [in]. "Work space" is the folded parametrisation: a linear's
weight there is diag(1/row) · W · diag(col) and its input X / col, where W and X are the live
(unfolded) model's.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from ..errors import LowbitError
from ..formats import Format, QuantizedTensor
from ..formats.map import Formats, per_linear
from ..model.arch import BalanceGroup
from ..model.layer import LayerData
from .base import LayerResult, Method

log = logging.getLogger(__name__)

# Linears whose outputs meet in q·kᵀ: their own output error says little about the attention
# scores, so AutoAWQ never clips them (its `avoid_clipping`); a fused qkv holds q and k rows.
_NO_CLIP = ("q_proj", "k_proj", "qkv_proj")


# -- pure math ------------------------------------------------------------------------------------
@contextlib.contextmanager
def one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run the many small and medium tensor steps of a search on one CPU thread (no-op elsewhere).

    On a CPU that others share, torch's threads wait on each other at every step; measured on 2
    busy cores, such loops ran 3-5x slower on 2 threads than on 1. The old count is restored.
    """
    if torch.device(device).type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def awq_scales(x: torch.Tensor, alpha: float, w_mean: torch.Tensor | None = None) -> torch.Tensor:
    """s = x^α, or x^α / w̄^(1−α) with duo scaling, normalised so that max(s)·min(s) = 1.

    Shapes: x (activation salience), w_mean [in] -> s [in]. α = 0 without w_mean gives s = 1 exactly.
    """
    s = x.pow(alpha)
    if w_mean is not None:
        s = s / (w_mean.pow(1 - alpha) + 1e-4)
    s = s.clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def weight_mean(W: torch.Tensor, fmt: Format) -> torch.Tensor:
    """AutoAWQ's w̄ for duo scaling: |W| relative to its group's absmax, averaged over rows.

    Shapes: W [rows, in] (the group's linears stacked) -> [in].
    """
    G = fmt.grouped(W).abs()
    return (G / (G.amax(dim=-1, keepdim=True) + 1e-6)).reshape(W.shape).mean(0)


def group_weight_mean(Ws: list[torch.Tensor], fmts: list[Format]) -> torch.Tensor:
    """`weight_mean` of the rows of several linears, each relative to its own format's groups.

    Shapes: Ws[k] [rows_k, in] -> [in]; equal to weight_mean(cat(Ws), fmt) when they share one format.
    """
    if all(f is fmts[0] for f in fmts):
        return weight_mean(torch.cat(Ws), fmts[0])
    rows = sum(W.shape[0] for W in Ws)
    return sum(weight_mean(W, f) * (W.shape[0] / rows) for W, f in zip(Ws, fmts))


def fold_norm_weight(w: torch.Tensor, s: torch.Tensor, plus_one: bool) -> torch.Tensor:
    """The norm weight whose output is the old output / s; Gemma's norm multiplies by (1 + w)."""
    return (1 + w) / s - 1 if plus_one else w / s


def clip_ratios(grid: int, max_shrink: float) -> list[float]:
    """AutoAWQ's shrink factors: 1, 1 − 1/grid, … down to (not below) 1 − max_shrink."""
    return [1 - i / grid for i in range(max(1, int(max_shrink * grid)))]


def diagonal_blocks(H: torch.Tensor, group_len: int) -> torch.Tensor:
    """The group-diagonal blocks of H. Shapes: H [in, in] -> [n_groups, group_len, group_len]."""
    n = H.shape[0] // group_len
    assert n * group_len == H.shape[0], f"group length {group_len} does not divide {H.shape[0]}"
    return H.reshape(n, group_len, n, group_len).diagonal(dim1=0, dim2=2).permute(2, 0, 1)


def group_errors(dW: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """E[(ΔW_g x_g)²] per row and group: the output error each group alone causes.

    Shapes: dW [out, in] or grouped [out, G, gl]; blocks [G, gl, gl] (`diagonal_blocks`) -> [out, G].
    """
    G, gl, _ = blocks.shape
    D = dW.reshape(dW.shape[0], G, gl).transpose(0, 1)  # [G, out, gl]
    return (torch.bmm(D, blocks) * D).sum(-1).T


def clip_search(W: torch.Tensor, blocks: torch.Tensor, fmt: Format,
                ratios: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group, the range shrink factor whose nearest-rounded group minimises that group's output
    error (AutoAWQ's auto_clip objective, on every token H was gathered on).

    Shapes: W [out, in], blocks [n_groups, gl, gl] (the group-diagonal blocks of E[x xᵀ] of W's input,
    `diagonal_blocks` or `InputStats.blocks`) -> clip [out, n_groups], error [out, n_groups].
    """
    fmt = fmt.for_tensor(W)  # per-tensor parameters from the whole W: the rows are then independent
    rows = max(1, ROW_CHUNK // W.shape[1])  # in row slices: the temporaries of a 14336-wide W are 235 MB each
    parts = [_clip_rows(W[i:i + rows], blocks, fmt, ratios) for i in range(0, W.shape[0], rows)]
    return torch.cat([b for b, _ in parts]), torch.cat([e for _, e in parts])


ROW_CHUNK = 1 << 23  # weights per row slice where rows are worked on independently (memory)


def _clip_rows(W: torch.Tensor, blocks: torch.Tensor, fmt: Format,
               ratios: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    Wg = fmt.grouped(W)  # [out, G, gl]: grid parameters broadcast over a group, no expanded copies
    best_err = best = None
    for r in ratios:
        qp = fmt.fit(W, r)
        scale, zero = qp.scale.float()[..., None], qp.zero.float()[..., None]
        W_r = fmt.dequantize_elementwise(fmt.quantize_elementwise(Wg, scale, zero), scale, zero)
        err = group_errors(W_r - Wg, blocks)
        if best is None:
            best_err, best = err, torch.full_like(err, r)
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, torch.full_like(best, r), best)
    return best, best_err


def row_gain(W: torch.Tensor, W_r: torch.Tensor, X: "InputStats") -> torch.Tensor:
    """Per row, the factor g that minimises E[(w·x − g · w_r·x)²]: g = E[(w·x)(w_r·x)] / E[(w_r·x)²].

    The clipping search shrinks each group's range on that group's own error, blind to the shrinks
    of a row adding up: its outputs come out coherently small (on Qwen2.5-0.5B g128, ~1% per
    linear, compounding over 24 layers; held-out KLD 0.142 with clipping against 0.133 without).
    The least-squares gain takes that common part out (KLD 0.117) and never raises a row's output
    error on the tokens X was gathered on, since g = 1 is among its choices.
    Shapes: W, W_r [out, in] (X's space) -> [out]; 1 where a row's reconstruction is silent.
    """
    num, den = X.row_products(W, W_r), X.row_products(W_r, W_r)
    g = num / den
    return torch.where((den > 0) & torch.isfinite(g), g, torch.ones_like(g))


# -- calibration statistics -------------------------------------------------------------------------
TOKEN_CHUNK = 1024  # tokens per slice where sampled inputs X are multiplied out (temporaries stay small)


class InputStats:
    """Moments of one linear input X [tokens, in].

    mean = E[x], sq = E[x²], abs = E[|x|] per channel [in]; the second moments E[x xᵀ] over the
    tokens of the first calibration batches (see `collect_stats`) come either as H [in, in] or,
    where those tokens are fewer than the input channels, as the tokens' inputs X [t, in] themselves:
    an 8B down_proj's H is 822 MB in float32, its 8192 search tokens 235 MB in bfloat16. Both give
    the same `output_error` and `blocks`; `H` is formed from X only when read.

    A scaled view (X / c) keeps the unscaled data and c: a search scales the stats once per candidate,
    and an [in, in] copy per candidate would be made for nothing where only the moments are used.

    fit: where asked for (`collect_stats`' fit_batches), H of other calibration batches, scaled along:
    for fitting on tokens other than those that judge the fit.
    """

    def __init__(self, mean: torch.Tensor, sq: torch.Tensor, abs: torch.Tensor, H: torch.Tensor | None = None,
                 c: torch.Tensor | None = None, X: torch.Tensor | None = None, fit: "InputStats | None" = None):
        assert (H is None) != (X is None), "second moments as H or as sampled inputs X, one of them"
        self.mean, self.sq, self.abs = mean, sq, abs
        self._H, self._X, self._c = H, X, c
        self.fit = fit

    @functools.cached_property
    def H(self) -> torch.Tensor:
        H = self._H if self._X is None else _gram(self._X)
        if self._c is None:
            return H
        return H.div(self._c[:, None]).div_(self._c[None, :])

    def blocks(self, group_len: int) -> torch.Tensor:
        """The group-diagonal blocks of H, [n_groups, group_len, group_len], without forming a scaled H."""
        if "H" in self.__dict__:
            return diagonal_blocks(self.H, group_len)
        raw = diagonal_blocks(self._H, group_len) if self._X is None else _gram_blocks(self._X, group_len)
        if self._c is None:
            return raw
        c = self._c.reshape(-1, group_len)
        return raw / (c[:, :, None] * c[:, None, :])

    def output_error(self, dW: torch.Tensor) -> float:
        """E[(ΔW x)²] averaged over outputs, for ΔW [out, in] acting on this (possibly scaled) input."""
        return float(self.row_products(dW, dW).sum()) / dW.shape[0]

    def row_products(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """E[(a_r·x)(b_r·x)] per row r, for A, B [out, in] acting on this (possibly scaled) input -> [out]."""
        same = B is A  # a square: one product with the inputs per token slice, not two
        if self._c is not None:
            A = A / self._c
            B = A if same else B / self._c
        if self._X is None:
            return (A @ self._H).mul_(B).sum(1)
        total = torch.zeros(A.shape[0], dtype=torch.float32, device=A.device)
        for part in self._X.split(TOKEN_CHUNK):
            part = part.T.float()
            AX = A @ part
            total += (AX.square_() if same else AX.mul_(B @ part)).sum(1)
        return total / max(self._X.shape[0], 1)

    def scaled(self, c: torch.Tensor) -> "InputStats":
        """The moments of X / c (c [in])."""
        c0 = c if self._c is None else self._c * c
        return InputStats(self.mean / c, self.sq / c**2, self.abs / c, self._H, c0, self._X,
                          None if self.fit is None else self.fit.scaled(c))

    def salience(self, kind: str) -> torch.Tensor:
        """Per-channel importance: E[x²] ("l2") or E[|x|] ("mean-abs", AutoAWQ's)."""
        return {"l2": self.sq, "mean-abs": self.abs}[kind]


def _gram(X: torch.Tensor) -> torch.Tensor:
    """XᵀX / t in float32, a slice of tokens at a time. Shapes: X [t, in] -> [in, in]."""
    H = torch.zeros(X.shape[1], X.shape[1], dtype=torch.float32, device=X.device)
    for part in X.split(TOKEN_CHUNK):
        part = part.float()
        H.addmm_(part.T, part)
    return H.div_(max(X.shape[0], 1))


def _gram_blocks(X: torch.Tensor, group_len: int) -> torch.Tensor:
    """The group-diagonal blocks of XᵀX / t. Shapes: X [t, in] -> [in / group_len, group_len, group_len]."""
    n = X.shape[1] // group_len
    assert n * group_len == X.shape[1], f"group length {group_len} does not divide {X.shape[1]}"
    out = torch.zeros(n, group_len, group_len, dtype=torch.float32, device=X.device)
    for part in X.split(TOKEN_CHUNK):
        g = part.float().reshape(-1, n, group_len).transpose(0, 1)  # [G, t, gl]
        out.baddbmm_(g.transpose(1, 2), g)
    return out.div_(max(X.shape[0], 1))


def _exact_narrow(X: torch.Tensor) -> torch.Tensor:
    """X in a 16-bit float type where that holds it exactly (a bf16 or fp16 model's activations)."""
    for dtype in (torch.bfloat16, torch.float16):
        narrow = X.to(dtype)
        if torch.equal(narrow.float(), X):
            return narrow
    return X


def _moment_terms(X: torch.Tensor, batch: int, stats_batches: int, hessian_batches: int,
                  sampled: bool, fit_batches: range) -> dict[str, torch.Tensor]:
    """One batch's terms of the moments: float32 within a batch, float64 across batches (H float32);
    with `sampled`, the batch's inputs themselves instead of its XᵀX."""
    terms = {}
    if batch < stats_batches:
        terms.update(sum=X.sum(0).double(), sq=X.square().sum(0).double(), abs=X.abs().sum(0).double(),
                     tokens=torch.tensor(X.shape[0], device=X.device))
    if batch < hessian_batches:
        terms.update(X=_exact_narrow(X)) if sampled else terms.update(H=X.T @ X)
        terms.update(h_tokens=torch.tensor(X.shape[0], device=X.device))
    if batch in fit_batches:
        terms.update(H_fit=X.T @ X, fit_tokens=torch.tensor(X.shape[0], device=X.device))
    return terms


def _moments(sums: dict[str, torch.Tensor], n_in: int, device: torch.device) -> InputStats:
    n = max(int(sums["tokens"]), 1) if "tokens" in sums else 1
    zero = torch.zeros(n_in, dtype=torch.float64, device=device)
    moments = ((sums.get("sum", zero) / n).float(), (sums.get("sq", zero) / n).float(),
               (sums.get("abs", zero) / n).float())
    fit = None
    if "H_fit" in sums:
        fit = InputStats(*(torch.zeros_like(m) for m in moments), sums["H_fit"] / max(int(sums["fit_tokens"]), 1))
    if "X" in sums:
        return InputStats(*moments, X=sums["X"], fit=fit)
    H = sums["H"] / max(int(sums["h_tokens"]), 1) if "H" in sums else \
        torch.zeros(n_in, n_in, dtype=torch.float32, device=device)
    return InputStats(*moments, H, fit=fit)


def collect_stats(layer: LayerData, names: list[str], hessian_batches: int,
                  stats_batches: int | None = None, full_hessian: bool = True,
                  fit_batches: range = range(0)) -> dict[str, InputStats]:
    """One pass over the calibration batches: moments of each named linear's input.

    Moments use the first `stats_batches` batches (all when None), H the first `hessian_batches`,
    and the stats' `fit` H the batches in `fit_batches` (none by default);
    sums run in batch order, so processes sharing the batches get one process's figures exactly.
    Unless `full_hessian` (the caller reads every H), inputs with more channels than those batches
    have tokens keep the tokens' inputs instead of H (smaller; see `InputStats`).
    """
    limit = layer.n_batches if stats_batches is None else stats_batches
    if limit < layer.n_batches:
        layer = search_view(layer, max(limit, hessian_batches, fit_batches.stop))
    linear = layer.module.get_submodule
    h_tokens = sum(layer.batch_tokens[:hessian_batches])
    sampled = set() if full_hessian else {n for n in names if h_tokens < linear(n).in_features}
    sums = layer.batch_sums(names, lambda n, X, j: _moment_terms(X, j, limit, hessian_batches, n in sampled,
                                                                 fit_batches),
                            stacked=("X",))
    missing = [n for n in names if n not in sums]
    if missing:
        raise LowbitError(f"layer {layer.index}: no calibration input reached {', '.join(missing)}; "
                          "the architecture table's balance groups do not match the model")
    return {n: _moments(s, linear(n).in_features, linear(n).weight.device) for n, s in sums.items()}


def batches_for(layer: LayerData, tokens: int) -> int:
    """How many leading calibration batches hold at least `tokens` tokens (0 = all batches)."""
    if tokens <= 0:
        return layer.n_batches
    seen = 0
    for i, n in enumerate(layer.batch_tokens):
        seen += n
        if seen >= tokens:
            return i + 1
    return layer.n_batches


def search_view(layer: LayerData, n_batches: int) -> LayerData:
    """The same live layer seen through only its first `n_batches` calibration batches."""
    if n_batches >= layer.n_batches:
        return layer
    return layer.view(n_batches)


def candidate_view(layer: LayerData, n_batches: int) -> LayerData:
    """The first `n_batches` batches for judging candidates (α's) on the block objective. Under
    torch.distributed every process gets them all and judges its share of the candidates
    (`layer.map`): the block runs then repeat no work and exchange no outputs."""
    return layer.gathered(n_batches) if layer.dist is not None else search_view(layer, n_batches)


def first_best(losses: list[float]) -> int:
    """Index of the smallest finite loss, the earliest of equals; -1 when none is finite."""
    best = -1
    for i, loss in enumerate(losses):
        if loss < float("inf") and (best < 0 or loss < losses[best]):
            best = i
    return best


# -- folding -------------------------------------------------------------------------------------
@dataclass
class ScaledLayer:
    """A layer's float weights with scales folded in: the same function, re-parametrised.

    weights: linear -> W in work space [out, in]; col: linear -> [in] (work input = live input / col);
    row: linear -> [out] (work output = live output / row); updates: folded non-linear parameters.
    """

    weights: dict[str, torch.Tensor]
    col: dict[str, torch.Tensor]
    row: dict[str, torch.Tensor]
    updates: dict[str, torch.Tensor] = field(default_factory=dict)
    writable: set[str] = field(default_factory=set)  # weights `fold` may scale in place

    @classmethod
    def of(cls, layer: LayerData, consume: bool = False) -> "ScaledLayer":
        """The unscaled layer. Folds replace tensors, never write into them, so no copy is needed;
        with `consume`, folds write into the layer's own float32 copies of non-float32 weights
        instead (an 8B layer's 0.87 GB is then not held twice), and `layer.weights` change with them."""
        ws = dict(layer.weights)
        writable = set()
        if consume:
            writable = {n for n, W in ws.items() if W.data_ptr() != layer.module.get_submodule(n).weight.data_ptr()}
        return cls(ws, {n: torch.ones_like(W[0]) for n, W in ws.items()},
                   {n: torch.ones_like(W[:, 0]) for n, W in ws.items()}, writable=writable)

    def live(self, name: str, W: torch.Tensor) -> torch.Tensor:
        """A work-space weight of linear `name` expressed for the live (unfolded) layer."""
        return self.live_(name, W.clone())

    def live_(self, name: str, W: torch.Tensor) -> torch.Tensor:
        """`live`, overwriting W (float32) in place."""
        return W.mul_(self.row[name][:, None]).div_(self.col[name][None, :])

    def param(self, layer: LayerData, name: str) -> torch.Tensor | None:
        """A non-linear parameter as folded so far (None if the layer has none of that name)."""
        if name in self.updates:
            return self.updates[name]
        try:
            return layer.param(name)
        except AttributeError:
            return None


def prev_rows(group: BalanceGroup, out_features: int) -> slice:
    """The rows of the preceding linear that feed the group (all rows unless `prev_rows` is set)."""
    if group.prev_rows is None:
        return slice(0, out_features)
    num, den = group.prev_rows
    part = out_features // den
    return slice(num * part, (num + 1) * part)


def unfoldable(layer: LayerData, state: ScaledLayer, group: BalanceGroup) -> str | None:
    """Why `group`'s scales cannot be folded in this layer, or None if they can."""
    if any(n not in state.weights for n in group.linears):
        return "its linears are not in this layer"
    widths = {state.weights[n].shape[1] for n in group.linears}
    if len(widths) != 1:
        return "its linears differ in in_features"
    width = widths.pop()
    if group.prev in state.weights:  # a linear: its (selected) output rows must match one to one
        out = state.weights[group.prev].shape[0]
        r = prev_rows(group, out)
        if (group.prev_rows and out % group.prev_rows[1]) or r.stop - r.start != width:
            return f"{group.prev} rows do not match one to one (e.g. grouped-query attention)"
        return None
    w = state.param(layer, group.prev + ".weight")
    if w is None or tuple(w.shape) != (width,):
        return f"{group.prev} has no weight of {width} channels"
    return None


def fold(layer: LayerData, state: ScaledLayer, group: BalanceGroup, s: torch.Tensor) -> None:
    """Scale input channels of the group's linears by s and divide the preceding op's outputs by s."""
    for n in group.linears:
        if n in state.writable:
            state.weights[n].mul_(s[None, :])
        else:
            state.weights[n] = state.weights[n] * s[None, :]
        state.col[n] = state.col[n] * s
    if group.prev in state.weights:
        rows = prev_rows(group, state.weights[group.prev].shape[0])
        W = state.weights[group.prev] if group.prev in state.writable else state.weights[group.prev].clone()
        W[rows] = W[rows] / s[:, None]
        state.weights[group.prev] = W
        r = state.row[group.prev].clone()
        r[rows] = r[rows] * s
        state.row[group.prev] = r
        bias = state.param(layer, group.prev + ".bias")
        if bias is not None:
            b = bias.clone()
            b[rows] = b[rows] / s
            state.updates[group.prev + ".bias"] = b
        return
    w = state.param(layer, group.prev + ".weight")
    state.updates[group.prev + ".weight"] = fold_norm_weight(w, s, layer.family.norm_plus_one)
    bias = state.param(layer, group.prev + ".bias")
    if bias is not None:  # a LayerNorm's shift is part of its output, so it is divided too
        state.updates[group.prev + ".bias"] = bias / s


# -- objectives -------------------------------------------------------------------------------------
def single_linear(group: BalanceGroup) -> bool:
    """Whether the group's block is its one linear (v -> o, up -> down), judged from H alone."""
    return len(group.linears) == 1 and group.block == group.linears[0]


Objective = Callable[[dict[str, Callable[[], torch.Tensor]]], float]  # {linear: () -> W_r} -> loss


def block_objective(view: LayerData, state: ScaledLayer, group: BalanceGroup,
                    X: InputStats, originals: dict[str, torch.Tensor]) -> Objective:
    """loss({linear: () -> W_r in work space}) = MSE of the group's block output. The weights come
    as functions so that only one linear's float32 candidate exists at a time (235 MB for an 8B MLP).

    A block that is one linear needs no forward pass: its output MSE is exactly E[(ΔW x)²], from X
    (the moments of its live input, on the same tokens). Other blocks are run on `view`'s batches.
    """
    if single_linear(group):
        n = group.block
        return lambda W_r: X.output_error(state.live_(n, W_r[n]()).sub_(originals[n]))
    ref = view.run_block(group.block)
    total = sum(r.numel() for r in ref)

    def loss(W_r: dict[str, Callable[[], torch.Tensor]]) -> float:
        live = {n: state.live_(n, W_r[n]()).to(view.module.get_submodule(n).weight.dtype) for n in group.linears}
        outs = view.run_block(group.block, live)
        return float(sum(((o - r) ** 2).sum() for o, r in zip(outs, ref)) / total)
    return loss


# -- the method ------------------------------------------------------------------------------------
@dataclass
class LayerPlan:
    """Scales searched and folded for one layer, before any codes are chosen."""

    state: ScaledLayer
    stats: dict[str, InputStats]   # keyed by input (see `input_keys`), live space
    keys: dict[str, str]           # linear -> its input key
    info: dict[str, dict]          # balance group prev -> what the search found
    # linear -> (codes a search already chose, its row scale then); reused while the rows stay put
    chosen: dict[str, tuple[QuantizedTensor, torch.Tensor]] = field(default_factory=dict)

    def inputs(self, name: str) -> InputStats:
        """Moments of linear `name`'s input in work space."""
        return self.stats[self.keys[name]].scaled(self.state.col[name])


def input_keys(layer: LayerData) -> dict[str, str]:
    """linear -> the first linear of its balance group (they share one input), else itself."""
    keys = {n: n for n in layer.weights}
    for g in layer.family.balance:
        if all(n in keys for n in g.linears):
            for n in g.linears:
                keys[n] = g.linears[0]
    return keys


SEARCH_DTYPES = {"auto": None, "model": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


# bf16's rounding (2^-8 relative) lies well below the error of grids of up to ~6 bits per weight (their
# scales included); on 8-bit grids it does not, and the α ranking turns to noise (q8_0 ended worse than RTN)
AUTO_SEARCH_MAX_BITS = 6.0


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 matrix products outrun float32 on `device`: CUDA GPUs from Ampere on, and CPUs with
    bf16 instructions (AVX512-BF16 or AMX). Elsewhere oneDNN converts bf16 through float32 and a product
    runs slower: 7x on an AVX2-only EPYC (4096x896 by 896x4864: 2.38 s against 0.34 s)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    if device.type != "cpu":
        return False
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's own checks (private)
    return any(getattr(torch.cpu, p, lambda: False)() for p in probes)


def search_dtype(name: str, layer: LayerData, fmt: Formats) -> torch.dtype | None:
    """The dtype the α search runs its block forwards in (None: the layer's own). "auto": a bf16
    copy of a layer that computes in float32 when every linear's grid is coarse (≤ AUTO_SEARCH_MAX_BITS
    bits per weight; on CPUs with bf16 instructions measured 1.4-2.3x faster, KLD within ±2.5% either way
    over awq, dh-awq, awq-joint on SmolLM2 and Qwen2.5-0.5B at 4 bits) and the device runs bf16 fast
    (`fast_bf16`), else the layer itself."""
    if name != "auto":
        return SEARCH_DTYPES[name]
    param = next(layer.module.parameters())
    if param.dtype in (torch.float16, torch.bfloat16) or not fast_bf16(param.device):
        return None
    fmts = per_linear(fmt, layer.weights)
    coarse = all(f.bits_per_weight(layer.weights[n].shape[1]) <= AUTO_SEARCH_MAX_BITS for n, f in fmts.items())
    return torch.bfloat16 if coarse else None


def clippable(name: str) -> bool:
    return name.rsplit(".", 1)[-1] not in _NO_CLIP


class AWQ(Method):
    """Standard AWQ: scale search per balance group, clipping search per linear, nearest rounding.

    Options: n_grid α points in [0, 1); salience "l2" (E[x²]) or "mean-abs" (E|x|); duo_scaling
    (x̄^α / w̄^(1−α)); clip on/off with AutoAWQ's clip_grid/max_shrink; row_gain: each final row's
    least-squares gain (`row_gain`) folded into its scales, where the format's scales can carry it
    (off: AutoAWQ's codes and scales exactly); search_dtype: the dtype the block objective's forward
    passes run in ("auto": see `search_dtype`; "model": the compute dtype; "bfloat16" / "float16": a
    copy of the layer in that dtype, faster on CPUs with 16-bit matrix units); search_tokens: calibration
    tokens the block objective and H use (0 = all, as AutoAWQ). The search runs each group's block
    n_grid times over those tokens: on a CPU, about 18 forward passes of the layer with all 128×512
    tokens, 3 with --search-tokens 8192. importance: formats whose encoders weigh weights by an
    importance vector (GGUF's imatrix) get E[x²] of each linear's folded input, as llama-quantize
    --imatrix would from an imatrix of the folded model.

    Per linear the format may differ (a GGUF preset): the α search rounds each linear onto its own
    format's `search_grid` (a min-max stand-in where the real encoder is slow, the K-quants), the
    clipping search runs where that stand-in is the format itself (K-quant encoders search their own
    range, weighted by the importance), and the final codes are the format's own encoding.
    """

    name = "awq"
    defaults = {"n_grid": 20, "salience": "l2", "duo_scaling": False, "clip": True, "clip_grid": 20,
                "max_shrink": 0.5, "row_gain": True, "search_tokens": 8192, "search_dtype": "auto", "importance": True}
    # whether some step reads all of E[x xᵀ] (`InputStats.H`); AWQ's read only output errors and diagonal blocks
    full_hessian = False

    def __init__(self, **options):
        super().__init__(**options)
        o = self.options
        self.check_choice("salience", ("l2", "mean-abs"))
        if o["n_grid"] < 1 or o["clip_grid"] < 1 or not 0 <= o["max_shrink"] < 1:
            raise LowbitError("--n-grid and --clip-grid must be ≥ 1 and --max-shrink in [0, 1)")
        self.check_choice("search_dtype", SEARCH_DTYPES)

    # The steps a variant may replace -----------------------------------------------------------
    def round(self, W: torch.Tensor, qt: QuantizedTensor, X: InputStats, name: str,
              stats: dict | None = None) -> QuantizedTensor:
        """Final codes for W (work space) on the grid of `qt`, the format's own encoding of W.

        X: moments of W's input in work space. AWQ keeps the format's (nearest) rounding.
        """
        return qt

    def rescaled(self, W: torch.Tensor, qt: QuantizedTensor, X: InputStats, stats: dict | None = None) -> QuantizedTensor:
        """`qt` (codes of W, work space) with each row's least-squares gain in its scales, if enabled
        and the format's scales can carry a factor per row."""
        if not self.options["row_gain"]:
            return qt
        g = row_gain(W, qt.dequantize(), X)
        out = qt.format.rescale_rows(qt, g)
        if out is None:
            return qt
        if stats is not None:
            stats["gain_dev"] = float((g - 1).abs().mean())
        return out

    def rounded(self, W: torch.Tensor, s: torch.Tensor, grid: Format, Xs: InputStats, name: str) -> torch.Tensor:
        """Q(W·s)/s [out, in] on `grid` with this method's rounding, a slice of rows at a time: rows
        round independently, and whole-matrix temporaries of an 8B MLP weight are 235 MB each."""
        grid = grid.for_tensor(W * s)  # a temporary: the slices are scaled one at a time below
        out = torch.empty_like(W)
        rows = max(1, ROW_CHUNK // W.shape[1])
        for i in range(0, W.shape[0], rows):
            part = W[i:i + rows] * s
            out[i:i + rows] = self.round(part, grid.encode(part), Xs, name).dequantize().div_(s)
        return out

    def hessian_tokens(self) -> int:
        return self.options["search_tokens"]

    def stats_tokens(self) -> int:
        return 0

    def fit_batches(self, layer: LayerData) -> range:
        """Calibration batches whose H `plan`'s stats carry as their `fit` (none: AWQ fits nothing on H)."""
        return range(0)

    # Orchestration -------------------------------------------------------------------------------
    def quantize_layer(self, layer: LayerData, fmt: Formats) -> LayerResult:
        fmt = per_linear(fmt, layer.weights)
        plan = self.plan(layer, fmt)
        layer.release_weights()  # the searches were the last to run the layer: the plan holds the rest
        quantized, stats = self.encode(layer, plan, fmt)
        return LayerResult(quantized, plan.state.updates, {"groups": plan.info, **stats})

    def importance(self, X: InputStats, fmt: Format) -> torch.Tensor | None:
        """The imatrix for `fmt`'s encoder: E[x²] of the (work-space) input, if the format takes one."""
        return X.sq if self.options["importance"] and fmt.uses_importance else None

    def plan(self, layer: LayerData, fmt: Formats) -> LayerPlan:
        """Search every balance group's scales in order, each on the layer with the earlier ones folded."""
        keys = input_keys(layer)
        reps = list(dict.fromkeys(keys.values()))
        stats_b = batches_for(layer, self.stats_tokens()) if self.stats_tokens() else None
        stats = collect_stats(layer, reps, batches_for(layer, self.hessian_tokens()), stats_b, self.full_hessian,
                              self.fit_batches(layer))
        view = candidate_view(layer, batches_for(layer, self.options["search_tokens"]))
        narrow = search_dtype(self.options["search_dtype"], layer, fmt)
        if narrow is not None:
            view = view.narrowed(narrow)
        plan = LayerPlan(ScaledLayer.of(layer, consume=True), stats, keys, {})
        # a one-linear block's objective compares with that linear's original weights (layer.weights),
        # so it is folded in place only once its own group has been searched
        originals = {g.linears[0] for g in layer.family.balance if single_linear(g)}
        held = plan.state.writable & originals
        plan.state.writable -= held
        for group in layer.family.balance:
            why = unfoldable(layer, plan.state, group)
            if why:
                log.debug("layer %s: skipping balance group %s -> %s: %s", layer.index, group.prev,
                          ",".join(group.linears), why)
                continue
            s, info = self.search(layer, view, plan, group, fmt)
            if single_linear(group) and group.linears[0] in held:
                plan.state.writable.add(group.linears[0])
            if not torch.all(s == 1):
                fold(layer, plan.state, group, s)
            plan.info[group.prev] = info
        return plan

    def search(self, layer: LayerData, view: LayerData, plan: LayerPlan, group: BalanceGroup,
               fmt: Formats) -> tuple[torch.Tensor, dict]:
        """AutoAWQ's grid: α = i / n_grid, s(α) applied as Q(W·s)/s, the block-output MSE minimised."""
        grids = {n: f.search_grid() for n, f in per_linear(fmt, group.linears).items()}
        X = plan.inputs(group.linears[0])
        x = X.salience(self.options["salience"])
        w_mean = None
        if self.options["duo_scaling"]:
            w_mean = group_weight_mean([plan.state.weights[n] for n in group.linears],
                                       [grids[n] for n in group.linears])
        loss_of = block_objective(view, plan.state, group, plan.stats[plan.keys[group.linears[0]]], layer.weights)

        def loss_at(i: int) -> float:
            s = awq_scales(x, i / self.options["n_grid"], w_mean)
            Xs = X.scaled(s)
            return loss_of({n: functools.partial(self.rounded, plan.state.weights[n], s, grids[n], Xs, n)
                            for n in group.linears})

        # α's are independent: under torch.distributed each process judges a share on all search tokens
        found = layer.map(range(self.options["n_grid"]), loss_at)
        losses = [found[i] for i in range(self.options["n_grid"])]
        i = first_best(losses)
        if i < 0:  # no finite loss at all: leave the group unscaled
            return torch.ones_like(x), {"alpha": 0.0, "loss": float("inf"), "loss_alpha0": losses[0]}
        alpha = i / self.options["n_grid"]
        return awq_scales(x, alpha, w_mean), {"alpha": alpha, "loss": losses[i], "loss_alpha0": losses[0]}

    def encode(self, layer: LayerData, plan: LayerPlan, fmt: Formats) -> tuple[dict[str, QuantizedTensor], dict]:
        """Clip search (skipping q/k) and rounding for every linear, on the folded weights."""
        ratios = clip_ratios(self.options["clip_grid"], self.options["max_shrink"])
        fmts = per_linear(fmt, plan.state.weights)

        def one(n: str) -> tuple[QuantizedTensor, float | None, dict]:
            W, X, f = plan.state.weights[n], plan.inputs(n), fmts[n]
            clip, rstats = None, {}
            if self.options["clip"] and clippable(n) and f.search_grid() is f:
                clip, _ = clip_search(W, X.blocks(f.group_length(W.shape[1])), f, ratios)
            qt = f.encode(W, clip, importance=self.importance(X, f))
            qt = self.rescaled(W, self.round(W, qt, X, n, rstats), X, rstats)
            return qt, None if clip is None else float(clip.mean()), rstats

        # independent per linear: under torch.distributed each process takes a share (by weight size)
        done = layer.map(list(plan.state.weights), one, cost=lambda n: plan.state.weights[n].numel())
        quantized = {n: qt for n, (qt, _, _) in done.items()}
        clips = {n: c for n, (_, c, _) in done.items() if c is not None}
        rstats = {n: r for n, (_, _, r) in done.items()}
        out: dict = {"clip_mean": clips}
        if any(rstats.values()):
            out["rounding"] = {n: v for n, v in rstats.items() if v}
        return quantized, out
