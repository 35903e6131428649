"""What a method sees of one decoder layer: float weights and calibration activations.

This is the only bridge between modules and the pure solvers: it hands out tensors, and it
runs the layer (or one block of it) when a solver needs outputs.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from .arch import Family
from .stream import Batch


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


class LayerData:
    """One decoder layer (or lm_head) ready to be quantized.

    weights: linear name (relative to the layer) -> W [out, in], float32 copies.
    """

    def __init__(self, index: int | str, module: nn.Module, family: Family, batches: Sequence[Batch],
                 linear_names: Sequence[str], run: Callable[[Batch], object]):
        self.index = index
        self.family = family
        self.module = module
        self.batches = batches
        self.run = run
        self.weights: dict[str, torch.Tensor] = {
            n: module.get_submodule(n).weight.detach().float().clone() for n in linear_names
        }
        self._inputs: dict[str, torch.Tensor] = {}
        self._block_inputs: dict[str, list[tuple[tuple, dict]]] = {}

    @property
    def has_calibration(self) -> bool:
        return len(self.batches) > 0

    @torch.no_grad()
    def linear_inputs(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Calibration inputs of the named linears, X [n_tokens, in] (float32), cached."""
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

        Linears that share one input tensor (q, k, v) are reported once, under the first name.
        Returns name -> the name its input is reported under (itself for the first of a group).
        """
        shared: dict[str, str] = {}

        def make_hook(n):
            def hook(_m, args):
                x = args[0]
                if id(x) in seen:
                    shared.setdefault(n, seen[id(x)][0])
                    return
                seen[id(x)] = (n, x)  # holding x keeps its id from being reused by a later tensor
                shared.setdefault(n, n)
                fn(n, x.reshape(-1, x.shape[-1]).float())
            return hook

        handles = [self.module.get_submodule(n).register_forward_pre_hook(make_hook(n)) for n in names]
        try:
            for b in self.batches:
                seen: dict[int, tuple[str, torch.Tensor]] = {}
                self.run(b)
                seen = {}
        finally:
            for h in handles:
                h.remove()
        return shared

    @torch.no_grad()
    def block_inputs(self, block: str) -> list[tuple[tuple, dict]]:
        """The (args, kwargs) module `block` receives for each calibration batch, cached."""
        if block not in self._block_inputs:
            calls: list[tuple[tuple, dict]] = []
            h = self.module.get_submodule(block).register_forward_pre_hook(
                lambda _m, args, kwargs: calls.append((args, dict(kwargs))), with_kwargs=True)
            try:
                for b in self.batches:
                    self.run(b)
            finally:
                h.remove()
            self._block_inputs[block] = calls
        return self._block_inputs[block]

    @torch.no_grad()
    def run_block(self, block: str, weights: dict[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Outputs of module `block` on its calibration inputs, with some linears' weights replaced.

        `weights` maps linear names (relative to the layer) to W [out, in]; originals are restored.
        """
        module = self.module.get_submodule(block)
        saved = {}
        try:
            for n, W in (weights or {}).items():
                lin = self.module.get_submodule(n)
                saved[n] = lin.weight.data
                lin.weight.data = W.to(device=saved[n].device, dtype=saved[n].dtype)
            outs = []
            for args, kwargs in self.block_inputs(block):
                y = module(*args, **kwargs)
                outs.append((y[0] if isinstance(y, tuple) else y).float())
            return outs
        finally:
            for n, W in saved.items():
                self.module.get_submodule(n).weight.data = W

    def param(self, name: str) -> torch.Tensor:
        """A non-linear parameter of the layer (e.g. a norm weight), float32 copy."""
        return self.module.get_parameter(name).detach().float().clone()
