"""awq-joint: scales, clipping ranges and rounding fitted together against the reconstruction
objective (seed 000), instead of one after the other as AWQ does.

Per balance group:
 1. screen every α of the grid with its clipping ranges already searched (per group of weights,
    on E[(ΔW_g x_g)²] from H), on a strided sample of rows: the α ranking sees the ranges it will
    be quantized with;
 2. for the `top_k` screened α and for plain RTN, fit ranges and codes on all rows (codes by the
    rounding below), measure the group's real objective (its block's output MSE on the search
    tokens) and keep the best, so no group ends worse than RTN on it.
Linears outside any group, and those whose rows a later group rescales, get the same clipping and
rounding at the end.
Per decoder layer, last ("refine", `--refine-steps`, 0 = off): every linear's codes and group
ranges on an integer grid, started where the steps above left them, are tuned together by signed
gradient steps on the MSE of the whole layer's output (SignRound's optimizer; `signround.py`),
against the float model's output for that layer (`--refine-target float`: the unquantized model's
own activations, which the pipeline then carries beside the quantized ones, so a layer also makes
up for the error of those before it) or the float layer's on the quantized inputs (`layer`).
The tuned codes are kept only where they end with the lower MSE over all calibration batches.

Rounding ("cd"): coordinate descent on the layer-output error tr(ΔW H ΔWᵀ), H = E[x xᵀ], with the
grid fixed. Starting from nearest rounding, each step considers, for one column and all rows at
once, moving a weight to the other grid point around it (DH-AWQ's flip) and takes the move where
it lowers the error. Weights so stay within one grid step of their float value (AdaRound's search
space): letting them move to any grid point fitted the calibration tokens better and held-out text
worse (first 6 layers of SmolLM2, g64: KLD 0.0506 against 0.0447, p99 0.53 against 0.44).
H holds E[x] E[x]ᵀ, so DH-AWQ's mean error b = μᵀΔW is part of what this lowers: it is DH's
heuristic with the full second moment in place of the mean.
"""
from __future__ import annotations

import torch

from ..errors import LowbitError
from ..formats import Format, QParams, QuantizedTensor
from ..formats.map import Formats, per_linear
from ..model.arch import BalanceGroup
from ..model.layer import LayerData
from .awq import (AWQ, InputStats, LayerPlan, awq_scales, block_objective, clip_ratios, clip_search, clippable,
                  group_weight_mean, one_cpu_thread, search_dtype)
from .base import LayerResult
from .signround import GridTuner, sign_descent, tunable


# -- pure math ------------------------------------------------------------------------------------
def damped(H: torch.Tensor, damp: float) -> torch.Tensor:
    """H + damp · mean(diag H) · I: keeps every coordinate's curvature positive, and the codes near
    nearest rounding where the calibration tokens say little."""
    return H + damp * H.diagonal().mean().clamp(min=1e-12) * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)


def cd_round(W: torch.Tensor, W_q: torch.Tensor, qp: QParams, fmt: Format, H: torch.Tensor,
             sweeps: int = 2, block: int = 128) -> tuple[torch.Tensor, int]:
    """Coordinate descent on tr((W_r − W) H (W_r − W)ᵀ) over each weight's two neighbouring grid
    points, grid parameters fixed; starts from nearest rounding W_q.

    Columns are visited in order, all rows at once; the gradient is kept current inside a block
    of columns and brought up to date for the rest after it (as GPTQ batches its updates).
    Shapes: W, W_q [out, in], H [in, in] (positive diagonal) -> codes [out, in], weights flipped.
    """
    codes, delta, valid = fmt.neighbour_codes(W, W_q, qp)
    step = torch.where(valid, delta, 0)  # W_r change of flipping, from nearest to the other point
    flipped = torch.zeros_like(valid)
    W_r = fmt.dequantize(W_q, qp)
    with one_cpu_thread(W.device):
        for _ in range(sweeps):
            before = flipped.clone()
            _sweep(W_r + step * flipped - W, step, flipped, H, block)
            if torch.equal(before, flipped):
                break
    return torch.where(flipped, codes, W_q), int(flipped.sum())


def _sweep(E: torch.Tensor, step: torch.Tensor, flipped: torch.Tensor, H: torch.Tensor, block: int) -> None:
    """One pass over the columns, flipping in place where that lowers the error.

    Shapes: E = W_r − W, step, flipped [out, in]; H [in, in].
    """
    out, n = E.shape
    curv = H.diagonal().clamp(min=1e-12).tolist()
    G = E @ H  # half the gradient of the error in W_r
    for b0 in range(0, n, block):
        b1 = min(b0 + block, n)
        Gb = G[:, b0:b1].clone()
        D = torch.zeros(out, b1 - b0, dtype=E.dtype, device=E.device)
        for j in range(b0, b1):
            g = Gb[:, j - b0]
            d = torch.where(flipped[:, j], -step[:, j], step[:, j])  # the move: flip, or flip back
            take = d * (g + g + d * curv[j]) < 0  # the error change of the move
            d = d * take
            flipped[:, j] ^= take
            D[:, j - b0] = d
            Gb.addr_(d, H[j, b0:b1])
        G += D @ H[b0:b1, :]


# -- the method ------------------------------------------------------------------------------------
class AWQJoint(AWQ):
    """Joint (α, clip) search, coordinate-descent rounding, block-objective selection with an RTN guard,
    then signed-gradient tuning of codes and ranges on the layer output.

    Options (beyond AWQ's): hessian_tokens for the moments and H (0 = all), search_tokens for the
    block forward passes, top_k screened α refined, screen_rows sampled per linear while screening,
    cd_sweeps, damp (H + damp·mean(diag H)·I), rounding "cd" or "nearest"; refine_steps (one
    calibration batch a step), refine_lr (0: 1 / refine_steps, SignRound's), refine_target.
    """

    name = "awq-joint"
    defaults = {**AWQ.defaults, "search_tokens": 4096, "hessian_tokens": 16384, "top_k": 2, "screen_rows": 256,
                "cd_sweeps": 2, "damp": 0.01, "rounding": "cd", "refine_steps": 100, "refine_lr": 0.0, "refine_target": "float"}
    full_hessian = True  # coordinate-descent rounding reads all of H

    def __init__(self, **options):
        super().__init__(**options)
        self.check_choice("rounding", ("cd", "nearest"))
        if self.options["top_k"] < 1 or self.options["screen_rows"] < 1:
            raise LowbitError("--top-k and --screen-rows must be ≥ 1")
        if self.options["refine_steps"] < 0 or self.options["refine_lr"] < 0:
            raise LowbitError("--refine-steps and --refine-lr must be ≥ 0 (--refine-lr 0: 1 / steps)")
        self.check_choice("refine_target", ("float", "layer"))

    def wants_float_stream(self) -> bool:
        return self.options["refine_steps"] > 0 and self.options["refine_target"] == "float"

    def quantize_layer(self, layer: LayerData, fmt: Formats) -> LayerResult:
        """AWQ's plan and this method's codes, then (decoder layers with calibration) the codes and
        ranges tuned on the layer's output by `refine`."""
        fmt = per_linear(fmt, layer.weights)
        refine = self.options["refine_steps"] > 0 and layer.has_calibration and isinstance(layer.index, int)
        targets = layer.float_outputs() if refine else None  # before anything is folded
        plan = self.plan(layer, fmt)
        layer.release_weights()
        quantized, stats = self.encode(layer, plan, fmt)
        if refine:
            quantized, stats["refine"] = self.refine(layer, plan, quantized, targets, fmt)
        return LayerResult(quantized, plan.state.updates, {"groups": plan.info, **stats})

    def refine(self, layer: LayerData, plan: LayerPlan, quantized: dict[str, QuantizedTensor],
               targets: list[torch.Tensor], fmt: Formats) -> tuple[dict[str, QuantizedTensor], dict]:
        """Codes and ranges of every linear on an integer grid moved by `sign_descent` on the MSE of
        the layer's output against `targets` (`LayerData.float_outputs`; step t on calibration batch
        t mod n); kept only if that MSE ends lower over all batches."""
        names = [n for n, qt in quantized.items() if tunable(qt)]
        if not names:
            return quantized, {"skipped": "no linear on an integer grid"}
        tuners = {n: GridTuner(plan.state.weights[n], quantized[n]) for n in names}
        fixed = {**plan.state.updates,
                 **{f"{n}.weight": qt.dequantize() for n, qt in quantized.items() if n not in tuners}}
        narrow = search_dtype(self.options["search_dtype"], layer, fmt)

        def loss_at(j: int, weights: dict[str, torch.Tensor]) -> torch.Tensor:
            """Output MSE on local batch j with the tuned linears' weights."""
            with torch.autocast(targets[j].device.type, dtype=narrow or torch.float32, enabled=narrow is not None):
                out = layer.forward_with({**fixed, **{f"{n}.weight": W for n, W in weights.items()}}, j)
            return (out - targets[j]).pow(2).mean()

        def grads_at(t: int, params: list[torch.Tensor]) -> list[torch.Tensor]:
            def local(j: int) -> list[torch.Tensor]:
                with torch.enable_grad():
                    return list(torch.autograd.grad(loss_at(j, {n: tu.weight() for n, tu in tuners.items()}), params))
            return layer.on_owner(t % layer.n_batches, local)

        def mse(qts: dict[str, QuantizedTensor]) -> float:
            weights = {n: qt.dequantize() for n, qt in qts.items()}
            per_batch = [layer.on_owner(j, lambda k: float(loss_at(k, weights))) for j in range(layer.n_batches)]
            return sum(m * n for m, n in zip(per_batch, layer.batch_tokens)) / sum(layer.batch_tokens)

        before = mse({n: quantized[n] for n in names})
        steps = self.options["refine_steps"]
        sign_descent(list(tuners.values()), grads_at, steps, self.options["refine_lr"] or 1 / steps)
        tuned = {n: tu.quantized() for n, tu in tuners.items()}
        after = mse(tuned)
        changed = sum(int((tuned[n].W_q != quantized[n].W_q).sum()) for n in names)
        rescaled = torch.cat([(tuned[n].qparams.scale / quantized[n].qparams.scale - 1).abs().flatten() for n in names])
        info = {"mse_before": before, "mse_after": after, "kept": after < before,
                "codes_changed_pct": 100 * changed / sum(quantized[n].W_q.numel() for n in names),
                "scale_change_mean": float(rescaled.mean())}
        return ({**quantized, **tuned} if after < before else quantized), info

    def hessian_tokens(self) -> int:
        return self.options["hessian_tokens"]

    def stats_tokens(self) -> int:
        return self.options["hessian_tokens"]

    def round(self, W: torch.Tensor, qt: QuantizedTensor, X: InputStats, name: str,
              stats: dict | None = None) -> QuantizedTensor:
        if self.options["rounding"] == "nearest" or self.options["cd_sweeps"] < 1:
            return qt
        W_q, flipped = cd_round(W, qt.W_q, qt.qparams, qt.format, damped(X.H, self.options["damp"]),
                                self.options["cd_sweeps"])
        if stats is not None:
            stats["flipped_pct"] = 100 * flipped / W.numel()
        return QuantizedTensor(W_q, qt.qparams, qt.format)

    def screen(self, layer: LayerData, plan: LayerPlan, group: BalanceGroup,
               fmt: Formats) -> list[tuple[float, float, torch.Tensor]]:
        """Every α with its clipping ranges searched: (summed group errors, α, s), best first.

        Rows add up independently in the error, so a fixed strided sample of `screen_rows` rows per
        linear ranks the α's at a fraction of the cost; the chosen few are refitted on all rows.
        Each linear is rounded onto its format's `search_grid` here.
        """
        grids = {n: f.search_grid() for n, f in per_linear(fmt, group.linears).items()}
        X = plan.inputs(group.linears[0])
        x = X.salience(self.options["salience"])
        w_mean = None
        if self.options["duo_scaling"]:
            w_mean = group_weight_mean([plan.state.weights[n] for n in group.linears],
                                       [grids[n] for n in group.linears])
        ratios = clip_ratios(self.options["clip_grid"], self.options["max_shrink"])
        sample = {n: _strided_rows(plan.state.weights[n], self.options["screen_rows"]) for n in group.linears}

        def error_at(i: int) -> float:
            s = awq_scales(x, i / self.options["n_grid"], w_mean)
            Xs = X.scaled(s)
            err = 0.0
            for n in group.linears:
                use = ratios if self.options["clip"] and clippable(n) else [1.0]
                blocks = Xs.blocks(grids[n].group_length(sample[n].shape[1]))
                err += float(clip_search(sample[n] * s, blocks, grids[n], use)[1].sum())
            return err

        # α's are independent: under torch.distributed each process screens a share
        errors = layer.map(range(self.options["n_grid"]), error_at)
        found = [(errors[i], i / self.options["n_grid"], awq_scales(x, i / self.options["n_grid"], w_mean))
                 for i in range(self.options["n_grid"])]
        return sorted(found, key=lambda f: f[0])

    def search(self, layer: LayerData, view: LayerData, plan: LayerPlan, group: BalanceGroup,
               fmt: Formats) -> tuple[torch.Tensor, dict]:
        """The screened top_k (α, clip) pairs and plain RTN, each with its final codes, judged on the
        group's block objective; the best is kept (its codes too, see `encode`)."""
        fmts = per_linear(fmt, group.linears)
        X = plan.inputs(group.linears[0])
        loss_of = block_objective(view, plan.state, group, plan.stats[plan.keys[group.linears[0]]], layer.weights)
        with one_cpu_thread(X.mean.device):
            screened = self.screen(layer, plan, group, fmt)[: self.options["top_k"]]
        candidates = [(-1.0, torch.ones_like(X.mean)), *((alpha, s) for _, alpha, s in screened)]

        def judge(c: int) -> tuple[float, dict[str, QuantizedTensor]]:
            alpha, s = candidates[c]
            if alpha < 0:  # plain RTN
                qts = {n: fmts[n].encode(plan.state.weights[n], importance=self.importance(X, fmts[n]))
                       for n in group.linears}
            else:
                qts = self.fit_codes({n: plan.state.weights[n] * s for n in group.linears}, X.scaled(s), fmt)
            return loss_of({n: lambda qt=qt: qt.dequantize() / s for n, qt in qts.items()}), qts

        # candidates are independent: under torch.distributed each process fits and judges a share
        judged = layer.map(range(len(candidates)), judge)
        tried = [(judged[c][0], *candidates[c], judged[c][1]) for c in range(len(candidates))]
        loss, alpha, s, qts = min(tried, key=lambda t: t[0])
        for n, qt in qts.items():  # valid while no later fold rescales the rows of n
            plan.chosen[n] = (qt, plan.state.row[n].clone())
        return s, {"alpha": None if alpha < 0 else alpha, "loss": loss, "loss_rtn": tried[0][0]}

    def fit_codes(self, Ws: dict[str, torch.Tensor], X: InputStats, fmt: Formats) -> dict[str, QuantizedTensor]:
        """Clipping ranges (q/k excepted, and the K-quants, whose encoders search their own range) and
        codes for linears that share the input X (work space); the rows of linears on one format are
        rounded as one matrix."""
        ratios = clip_ratios(self.options["clip_grid"], self.options["max_shrink"])
        fmts = per_linear(fmt, Ws)
        out: dict[str, QuantizedTensor] = {}
        with one_cpu_thread(X.mean.device):
            qts = {}
            for n, W in Ws.items():
                f = fmts[n]
                clip = (clip_search(W, X.blocks(f.group_length(W.shape[1])), f, ratios)[0]
                        if self.options["clip"] and clippable(n) and f.search_grid() is f else None)
                qts[n] = f.encode(W, clip, importance=self.importance(X, f))
            for f in dict.fromkeys(fmts.values()):
                names = [n for n in Ws if fmts[n] is f]
                joint = self.round(torch.cat([Ws[n] for n in names]),
                                   QuantizedTensor(torch.cat([qts[n].W_q for n in names]),
                                                   QParams(torch.cat([qts[n].qparams.scale for n in names]),
                                                           torch.cat([qts[n].qparams.zero for n in names])),
                                                   qts[names[0]].format), X, ",".join(names))
                rows = [Ws[n].shape[0] for n in names]
                out.update({n: self.rescaled(Ws[n], QuantizedTensor(codes, qts[n].qparams, qts[n].format), X)
                            for n, codes in zip(names, joint.W_q.split(rows))})
        return {n: out[n] for n in Ws}

    def encode(self, layer: LayerData, plan: LayerPlan, fmt: Formats) -> tuple[dict[str, QuantizedTensor], dict]:
        """Codes chosen by the search where still valid; the same clip + rounding for the rest."""
        fmts = per_linear(fmt, plan.state.weights)
        quantized, errors = {}, {}
        for n, W in plan.state.weights.items():
            X = plan.inputs(n)
            kept = plan.chosen.get(n)
            if kept is not None and torch.equal(kept[1], plan.state.row[n]):
                quantized[n] = kept[0]
            else:
                quantized[n] = self.fit_codes({n: W}, X, fmts[n])[n]
            errors[n] = X.output_error(quantized[n].dequantize() - W)
        return quantized, {"output_mse": errors}


def _strided_rows(W: torch.Tensor, n: int) -> torch.Tensor:
    """About `n` rows of W [out, in], evenly spaced (all rows when it has no more)."""
    return W if W.shape[0] <= n else W[:: -(-W.shape[0] // n)]
