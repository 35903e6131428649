"""Frozen, versioned configuration objects shared by the CLI, the API and the pipeline.

Variants are fields, not name suffixes: a scheme is (format, bits, group size, symmetry).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

SPEC_VERSION = 1


@dataclass(frozen=True)
class QuantScheme:
    """How a weight tensor is quantized.

    group_size: number of consecutive input channels sharing one scale (and zero);
    0 means one group per output channel (per-channel).
    """

    format: str = "int"
    bits: int = 4
    group_size: int = 128
    sym: bool = False

    def group_for(self, in_features: int) -> int:
        """The effective group length for a row of `in_features` weights."""
        return in_features if self.group_size == 0 else self.group_size


@dataclass(frozen=True)
class CalibConfig:
    """Which tokens the calibration sees: `n_samples` windows of `seq_len` tokens."""

    dataset: str = "default"
    n_samples: int = 128
    seq_len: int = 512
    seed: int = 0
    batch_size: int = 8


@dataclass(frozen=True)
class QuantizeConfig:
    """Everything that determines a quantization run's output (and nothing that doesn't)."""

    model_path: str
    output_dir: str
    method: str = "rtn"
    scheme: QuantScheme = field(default_factory=QuantScheme)
    export_format: str = "compressed-tensors"
    calib: CalibConfig = field(default_factory=CalibConfig)
    method_options: tuple[tuple[str, Any], ...] = ()
    device: str = "cpu"
    dtype: str = "auto"
    layer_batch_size: int = 16
    lmhead_chunks: int = 4
    quantize_lm_head: bool = False
    layers: str | None = None

    def options(self) -> dict[str, Any]:
        return dict(self.method_options)

    def recipe(self) -> dict[str, Any]:
        """The part of the config that defines the output (used to validate --resume)."""
        d = dataclasses.asdict(self)
        d["method_options"] = dict(self.method_options)
        d["spec_version"] = SPEC_VERSION
        for volatile in ("output_dir", "layer_batch_size", "device"):
            d.pop(volatile)
        return d
