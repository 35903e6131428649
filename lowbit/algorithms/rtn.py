"""Round-to-nearest on a min-max grid: the baseline every other method must beat."""
from __future__ import annotations

from ..formats.map import Formats, per_linear
from .base import LayerResult, Method


class RTN(Method):
    name = "rtn"
    needs_calibration = False

    def quantize_layer(self, layer, fmt: Formats) -> LayerResult:
        fmts = per_linear(fmt, layer.weights)
        return LayerResult({n: fmts[n].encode(W) for n, W in layer.weights.items()})
