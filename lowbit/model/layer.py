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

    def param(self, name: str) -> torch.Tensor:
        """A non-linear parameter of the layer (e.g. a norm weight), float32 copy."""
        return self.module.get_parameter(name).detach().float().clone()
