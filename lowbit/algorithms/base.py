"""The contract of a quantization method: one layer in, codes (and folded updates) out."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable

import torch

from ..errors import LowbitError
from ..formats import QuantizedTensor
from ..formats.map import Formats


@dataclass
class LayerResult:
    """What a method decided for one layer: plain data, applied and exported elsewhere.

    quantized: linear name -> codes + grid parameters (in the space the method left it in).
    updates: other parameters replaced by the method (e.g. a norm weight with AWQ scales folded).
    stats: per-layer figures for the log (flips used, chosen alpha, loss before/after, ...).
    """

    quantized: dict[str, QuantizedTensor]
    updates: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)


class Method(ABC):
    """A quantization algorithm. Subclasses declare `name`, `options` (defaults) and whether
    they need calibration activations, and register in ``algorithms/__init__``."""

    name: ClassVar[str]
    needs_calibration: ClassVar[bool] = True
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, **options: Any):
        unknown = set(options) - set(self.defaults)
        if unknown:
            raise LowbitError(f"method {self.name!r} has no option(s) {', '.join(sorted(unknown))}; "
                              f"it accepts: {', '.join(sorted(self.defaults)) or 'none'}")
        self.options = {**self.defaults, **options}

    def check_choice(self, key: str, choices: Iterable[str]) -> None:
        """Refuse option `key` unless its value is one of `choices`, naming the flag and what it takes."""
        value, choices = self.options[key], list(choices)
        if value not in choices:
            raise LowbitError(f"--{key.replace('_', '-')} must be one of {', '.join(choices)}, not {value!r}")

    @abstractmethod
    def quantize_layer(self, layer, fmt: Formats) -> LayerResult:
        """Quantize every linear in `layer` (a model.layer.LayerData) onto `fmt`'s grid: one Format
        for all, or {linear name: Format} (a GGUF preset; see formats/map.py's `per_linear`)."""

    def wants_float_stream(self) -> bool:
        """Whether layers should see the float model's outputs too (`LayerData.float_outputs`): the
        pipeline then carries the unquantized model's activations beside the quantized ones."""
        return False

    def propagation_dtype(self, layer, fmt: Formats) -> torch.dtype | None:
        """The dtype of the forward pass that hands the quantized layer's outputs to the next layer
        (None: the layer's own). A method whose own calibration forwards run narrower says so here,
        so that the next layer's inputs cost no more than they are worth to it."""
        return None
