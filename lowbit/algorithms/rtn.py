"""Round-to-nearest on a min-max grid: the baseline every other method must beat."""
from __future__ import annotations

from ..formats import Format
from .base import LayerResult, Method


class RTN(Method):
    name = "rtn"
    needs_calibration = False

    def quantize_layer(self, layer, fmt: Format) -> LayerResult:
        return LayerResult({n: fmt.encode(W) for n, W in layer.weights.items()})
