"""What a method sees of one decoder layer: float weights and calibration activations.

This is the only bridge between modules and the pure solvers: it hands out tensors, and it
runs the layer (or one block of it) when a solver needs outputs.

Under torch.distributed each process holds a share of the calibration batches (`BatchSplit`);
the methods below that say so return what a single process holding every batch would.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterable, Iterator, Sequence, TypeVar

import torch
from torch import nn

from ..distributed import Dist, all_sum, broadcast, map_keys
from .arch import Family
from .stream import Batch

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass(frozen=True)
class BatchSplit:
    """Which calibration batches this process holds: `ids` (ascending) are the global indices of
    its batches, `tokens` the token count of every global batch; `dist` is None for one process."""

    ids: tuple[int, ...]
    tokens: tuple[int, ...]
    dist: Dist | None = None

    @classmethod
    def whole(cls, batches: Sequence[Batch]) -> "BatchSplit":
        return cls(tuple(range(len(batches))), tuple(b.hidden.shape[:-1].numel() for b in batches))

    def first(self, n: int) -> "BatchSplit":
        """The global batches 0 .. n-1 only."""
        return BatchSplit(tuple(j for j in self.ids if j < n), self.tokens[:n], self.dist)


class _InputsSeen(Exception):
    """Raised from a forward hook once every input asked for was seen: stops the layer's forward early."""


class _RanInstead(Exception):
    """Carries the output of the module that computed in place of another (see `_run_instead`)."""

    def __init__(self, output: Any):
        self.output = output


def _run_instead(run: Callable[[Batch], Any], module: nn.Module, stand_in: nn.Module,
                 dtype: torch.dtype) -> Callable[[Batch], Any]:
    """`run` with `stand_in` computing wherever `module` would, on module's inputs cast to `dtype`
    (whatever `run` does around the module, e.g. a final norm before lm_head, still runs as it is)."""
    def hook(_m, args, kwargs):
        raise _RanInstead(stand_in(*_cast_floats(args, dtype), **_cast_floats(kwargs, dtype)))

    def run_instead(batch: Batch) -> Any:
        handle = module.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            return run(batch)
        except _RanInstead as done:
            return done.output
        finally:
            handle.remove()
    return run_instead


@contextlib.contextmanager
def replaced_parameters(module: nn.Module, params: dict[str, torch.Tensor]) -> Iterator[None]:
    """The named parameters of `module` ("input_layernorm.weight", ...) hold other values (cast to their
    own dtype and device) inside the block; the original tensors are put back, untouched, after it."""
    saved = {}
    try:
        for n, t in params.items():
            p = module.get_parameter(n)
            saved[n] = p.data
            p.data = t.to(device=saved[n].device, dtype=saved[n].dtype)
        yield
    finally:
        for n, t in saved.items():
            module.get_parameter(n).data = t


def replaced_weights(module: nn.Module, weights: dict[str, torch.Tensor]) -> contextlib.AbstractContextManager:
    """`replaced_parameters` for the named linears' weights W [out, in]."""
    return replaced_parameters(module, {f"{n}.weight": W for n, W in weights.items()})


@contextlib.contextmanager
def _input_hooks(module: nn.Module, names: Iterable[str], sink: dict[str, list[torch.Tensor]]) -> Iterator[None]:
    """Record the first positional input of each named submodule; hooks are always removed."""
    handles = []
    try:
        for n in names:
            def hook(_m, args, _n=n):
                sink.setdefault(_n, []).append(args[0].detach())
            handles.append(module.get_submodule(n).register_forward_pre_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


# Tokens per call when a block is run on one tensor: the sequences of a calibration batch are
# independent, and an 8B MLP's intermediates are 235 MB each for a batch of 8 × 512 tokens.
BLOCK_TOKENS = 1024


def _cast_tensor(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in `dtype` if it is floating point (a Parameter stays a Parameter), else t itself."""
    if not t.is_floating_point():
        return t
    cast = t.detach().to(dtype)
    return nn.Parameter(cast, requires_grad=False) if isinstance(t, nn.Parameter) else cast


def _cast_floats(x: Any, dtype: torch.dtype) -> Any:
    """Every floating-point tensor in a nest of tuples, lists and dicts cast to `dtype`."""
    if isinstance(x, torch.Tensor):
        return _cast_tensor(x, dtype)
    if isinstance(x, (tuple, list)):
        return type(x)(_cast_floats(v, dtype) for v in x)
    if isinstance(x, dict):
        return {k: _cast_floats(v, dtype) for k, v in x.items()}
    return x


def _one_tensor(args: tuple, kwargs: dict) -> bool:
    """Whether a block call is on one tensor [batch, ..., features] alone, so sequences split freely."""
    return not kwargs and len(args) == 1 and isinstance(args[0], torch.Tensor) and args[0].dim() >= 2


class LayerData:
    """One decoder layer (or lm_head) ready to be quantized.

    weights: linear name (relative to the layer) -> W [out, in], float32 and read-only: they share
    storage with the module's weights when those are float32 already (a copy would double a layer's
    footprint), so methods copy before changing them in place.
    """

    def __init__(self, index: int | str, module: nn.Module, family: Family, batches: Sequence[Batch],
                 linear_names: Sequence[str], run: Callable[[Batch], object], split: BatchSplit | None = None,
                 disposable: bool = False):
        self.index = index
        self.disposable = disposable  # see `release_weights`
        self.family = family
        self.module = module
        self.batches = batches  # this process's share (all of them in a single process)
        self.split = split or BatchSplit.whole(batches)
        assert len(self.split.ids) == len(batches), "one global index per local batch"
        self.run = run
        self.weights: dict[str, torch.Tensor] = {
            n: module.get_submodule(n).weight.detach().float() for n in linear_names
        }
        self._inputs: dict[str, torch.Tensor] = {}
        self._block_inputs: dict[str, list[tuple[tuple, dict]]] = {}
        self._block_source: LayerData | None = None  # see `narrowed`

    @property
    def has_calibration(self) -> bool:
        return self.n_batches > 0

    @property
    def n_batches(self) -> int:
        """Calibration batches over all processes."""
        return len(self.split.tokens)

    @property
    def batch_tokens(self) -> tuple[int, ...]:
        """Tokens of every calibration batch, over all processes, in order."""
        return self.split.tokens

    @property
    def dist(self) -> Dist | None:
        return self.split.dist

    def view(self, n_batches: int) -> "LayerData":
        """The same live layer seen through only the first `n_batches` calibration batches (no weights)."""
        split = self.split.first(n_batches)
        return LayerData(self.index, self.module, self.family, self.batches[:len(split.ids)], (), self.run, split)

    def gathered(self, n_batches: int) -> "LayerData":
        """The first `n_batches` calibration batches, every one held by this process (copied from the
        process that holds it): a one-process view, so work on it gives bit for bit one process's result.
        Meant for searches that split their candidates, not their tokens, over processes (`map`)."""
        split = self.split.first(n_batches)
        if self.dist is None:
            return self.view(n_batches)
        mine = dict(zip(self.split.ids, self.batches))
        batches = [broadcast(self.dist, mine.get(j), self.dist.owner(j)) for j in range(len(split.tokens))]
        return LayerData(self.index, self.module, self.family, batches, (), self.run, BatchSplit.whole(batches))

    def narrowed(self, dtype: torch.dtype) -> "LayerData":
        """This view run in `dtype` (`run`, `accumulate`, `run_block`): a copy of the module in that dtype,
        fed this view's inputs cast to it. For searches that rank candidates by a block's output:
        on CPUs with bf16 matrix units a bf16 forward runs 2-3x faster than a float32 one. The module
        is left as it is; the copy's parameters are cast one at a time (no float32 copy of the layer)."""
        params = list(self.module.parameters()) + list(self.module.buffers())
        if all(p.dtype == dtype or not p.is_floating_point() for p in params):
            return self
        memo = {id(p): _cast_tensor(p, dtype) for p in params}
        module = copy.deepcopy(self.module, memo)
        run = _run_instead(self.run, self.module, module, dtype)
        out = LayerData(self.index, module, self.family, self.batches, (), run, self.split)
        out._block_source = self
        return out

    def sum_over_processes(self, x):
        """A tensor or int summed over the processes that share the calibration batches (itself for one)."""
        return all_sum(self.dist, x)

    def map(self, keys: Sequence[K], fn: Callable[[K], V], cost: Callable[[K], float] = lambda k: 1.0) -> dict[K, V]:
        """{k: fn(k)}: independent jobs (e.g. one per linear), each run by one process and shared with all."""
        return map_keys(self.dist, keys, fn, cost)

    @torch.no_grad()
    def linear_inputs(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Calibration inputs of the named linears, X [n_tokens, in] (float32), cached (this process's batches)."""
        missing = [n for n in names if n not in self._inputs]
        if missing:
            sink: dict[str, list[torch.Tensor]] = {}
            with _input_hooks(self.module, missing, sink):
                for b in self.batches:
                    self.run(b)
            for n in missing:
                self._inputs[n] = torch.cat([x.reshape(-1, x.shape[-1]).float() for x in sink[n]])
        return {n: self._inputs[n] for n in names}

    @torch.no_grad()
    def accumulate(self, names: Sequence[str], fn: Callable[[str, torch.Tensor], None]) -> dict[str, str]:
        """Stream calibration inputs of the named linears to `fn(name, X [tokens, in])` without storing them.

        X comes in the dtype the layer computes in (a `narrowed` view's: bf16 products are cheaper).

        Linears that share one input tensor (q, k, v) are reported once, under the first name.
        Returns name -> the name its input is reported under (itself for the first of a group).
        Under torch.distributed `fn` sees this process's batches only; callers add up what it
        gathered with `sum_over_processes` (or use `batch_sums`, which does so in batch order).
        """
        shared = self._stream(names, lambda n, X, _j: fn(n, X), self.batches, self.split.ids)
        return broadcast(self.dist, shared, 0) if self.dist is not None else shared

    @torch.no_grad()
    def batch_sums(self, names: Sequence[str], contrib: Callable[[str, torch.Tensor, int], dict[str, torch.Tensor]],
                   stacked: Sequence[str] = ()) -> dict[str, dict[str, torch.Tensor]]:
        """Σ_j contrib(name, X_j [tokens, in], j) -> {key: sum} for the named linears, over calibration batches j.

        Each key's terms are added in batch order into zeros, whichever process ran batch j, so the sums
        are bit for bit those of one process holding every batch; the terms of `stacked` keys are
        concatenated along dim 0 in batch order instead. Linears sharing an input (q, k, v) appear once,
        under the first name (see `accumulate`).
        """
        sums: dict[str, dict[str, torch.Tensor]] = {}
        rows: dict[str, dict[str, list[torch.Tensor]]] = {}

        def add(found: dict[str, dict[str, torch.Tensor]]) -> None:
            for n, c in found.items():
                acc = sums.setdefault(n, {})  # a linear the batches reached, even with no terms
                for k, v in c.items():
                    if k in stacked:
                        rows.setdefault(n, {}).setdefault(k, []).append(v)
                        continue
                    if k not in acc:
                        acc[k] = torch.zeros_like(v)
                    acc[k] += v

        def stack() -> dict[str, dict[str, torch.Tensor]]:
            for n, parts in rows.items():
                sums[n].update({k: torch.cat(p) for k, p in parts.items()})
            return sums

        dist = self.dist
        if dist is None or dist.world == 1:
            self._stream(names, lambda n, X, j: add({n: contrib(n, X.float(), j)}), self.batches, self.split.ids)
            return stack()
        local = dict(zip(self.split.ids, self.batches))
        for start in range(0, self.n_batches, dist.world):  # a round: batch start + r runs on rank r
            found: dict[str, dict[str, torch.Tensor]] = {}
            j = start + dist.rank
            if j in local:
                self._stream(names, lambda n, X, j: found.__setitem__(n, contrib(n, X.float(), j)), [local[j]], [j])
            for src in range(min(dist.world, self.n_batches - start)):
                add(broadcast(dist, found if src == dist.rank else None, src))
        return stack()

    def _stream(self, names: Sequence[str], fn: Callable[[str, torch.Tensor, int], Any],
                batches: Sequence[Batch], ids: Sequence[int]) -> dict[str, str]:
        shared: dict[str, str] = {}

        def make_hook(n):
            def hook(_m, args):
                x = args[0]
                reached.add(n)
                if id(x) in seen:
                    shared.setdefault(n, seen[id(x)][0])
                else:
                    seen[id(x)] = (n, x)  # holding x keeps its id from being reused by a later tensor
                    shared.setdefault(n, n)
                    fn(n, x.reshape(-1, x.shape[-1]), j)
                if len(reached) == len(names):  # the rest of the layer computes nothing asked for
                    raise _InputsSeen
            return hook

        handles = [self.module.get_submodule(n).register_forward_pre_hook(make_hook(n)) for n in names]
        try:
            for j, b in zip(ids, batches):
                seen: dict[int, tuple[str, torch.Tensor]] = {}
                reached: set[str] = set()
                try:
                    self.run(b)
                except _InputsSeen:
                    pass
                seen = {}
        finally:
            for h in handles:
                h.remove()
        return shared

    @torch.no_grad()
    def block_inputs(self, block: str) -> list[tuple[tuple, dict]]:
        """The (args, kwargs) module `block` receives for each calibration batch, cached."""
        if block not in self._block_inputs and self._block_source is not None:
            dtype = next(self.module.get_submodule(block).parameters()).dtype
            self._block_inputs[block] = [(_cast_floats(args, dtype), _cast_floats(kwargs, dtype))
                                         for args, kwargs in self._block_source.block_inputs(block)]
        if block not in self._block_inputs:
            calls: list[tuple[tuple, dict]] = []

            def record(_m, args, kwargs):
                calls.append((args, dict(kwargs)))
                raise _InputsSeen  # nothing after the block's inputs is needed

            h = self.module.get_submodule(block).register_forward_pre_hook(record, with_kwargs=True)
            try:
                for b in self.batches:
                    try:
                        self.run(b)
                    except _InputsSeen:
                        pass
            finally:
                h.remove()
            self._block_inputs[block] = calls
        return self._block_inputs[block]

    @torch.no_grad()
    def run_block(self, block: str, weights: dict[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Outputs of module `block` on its calibration inputs, with some linears' weights replaced.

        `weights` maps linear names (relative to the layer) to W [out, in]; originals are restored.
        Under torch.distributed each process runs its batches and all get every output, in batch order.
        """
        module = self.module.get_submodule(block)

        def call(args, kwargs) -> torch.Tensor:
            y = module(*args, **kwargs)
            return (y[0] if isinstance(y, tuple) else y).float()

        with replaced_weights(self.module, weights or {}):
            outs = []
            for args, kwargs in self.block_inputs(block):
                if _one_tensor(args, kwargs):  # e.g. an MLP: run a few sequences at a time (see BLOCK_TOKENS)
                    x = args[0]
                    rows = max(1, BLOCK_TOKENS * x.shape[0] // max(1, x[..., 0].numel()))
                    outs.append(torch.cat([call((part,), {}) for part in x.split(rows)]))
                else:
                    outs.append(call(args, kwargs))
        if self.dist is None:
            return outs
        mine = dict(zip(self.split.ids, outs))
        return [broadcast(self.dist, mine.get(j), self.dist.owner(j)) for j in range(self.n_batches)]

    def on_owner(self, j: int, fn: Callable[[int], V]) -> V:
        """fn(local index of calibration batch j), run by the process that holds batch j and shared with
        all: work on one batch at a time that every process then continues from alike."""
        if self.dist is None:
            return fn(j)
        mine = self.split.ids.index(j) if j in self.split.ids else None
        return broadcast(self.dist, fn(mine) if mine is not None else None, self.dist.owner(j))

    @torch.no_grad()
    def float_outputs(self) -> list[torch.Tensor]:
        """What the float model's layer outputs on this process's batches (float32): the pipeline's
        float-stream targets where it carries them, else the layer as it is now on its own inputs."""
        if all(b.target is not None for b in self.batches):
            return [b.target.float() for b in self.batches]
        return [self.forward_with({}, j) for j in range(len(self.batches))]

    def forward_with(self, params: dict[str, torch.Tensor], j: int) -> torch.Tensor:
        """The layer's output on this process's calibration batch j (float32), with the named parameters
        ("mlp.down_proj.weight", "input_layernorm.weight", ...) replaced: differentiable in them, for
        solvers that tune parameters by gradient. Replacements are cast to each parameter's dtype."""
        own = dict(self.module.named_parameters())
        cast = {n: t.to(own[n].dtype) for n, t in params.items()}
        args, kwargs = self.block_inputs("")[j]
        y = torch.func.functional_call(self.module, cast, args, kwargs)
        return (y[0] if isinstance(y, tuple) else y).float()

    def release_weights(self) -> None:
        """Called by a method that from here on works only from its own copies of the weights and from
        statistics. If the layer is `disposable` (the pipeline's: it puts the quantized weights back),
        the module's and `weights`' references to the linears' weights are dropped, so that what no
        copy shares is freed (after AWQ folded its scales into copies: most of an 8B layer's 0.87 GB);
        `weights` keeps each shape, on the meta device, and the module cannot run until then."""
        if not self.disposable:
            return
        for n, W in self.weights.items():
            p = self.module.get_submodule(n).weight
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)
            self.weights[n] = torch.empty(W.shape, dtype=W.dtype, device="meta")

    def param(self, name: str) -> torch.Tensor:
        """A non-linear parameter of the layer (e.g. a norm weight), float32 copy."""
        return self.module.get_parameter(name).detach().float().clone()
