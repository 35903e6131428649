"""Which format each linear is quantized onto.

One format for every linear is the common case. A mixed GGUF preset is not: llama.cpp's Q4_K_M
gives ffn_down Q6_K in some layers and Q4_K in others, and rows a K-quant cannot hold fall back
per tensor (Q4_K -> Q5_0, Q6_K -> Q8_0). A `FormatMap` answers per linear; methods receive, per
layer, `Formats`: either one Format (every linear) or a mapping linear name -> Format, and turn
it into a dict with `per_linear`.

Shapes: `shape` is the PyTorch weight shape [out, in].
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Union

from ..errors import LowbitError
from .base import Format

Formats = Union[Format, Mapping[str, Format]]
Rule = Callable[[str, tuple[int, ...]], Format]


class FormatMap:
    """linear path (e.g. ``model.layers.3.mlp.down_proj``) and weight shape -> its Format.

    default: the format of every linear when `rule` is None, and the representative one otherwise
    (what an exporter that holds a single format reads). rule(path, shape) must return the same
    Format object for the same answer (formats are compared by identity), which `cached` ensures.
    info: plain data an exporter needs about the rule (the GGUF preset).
    """

    def __init__(self, default: Format, rule: Rule | None = None, **info: Any):
        self.default = default
        self._rule = rule
        self.info = info

    @classmethod
    def of(cls, formats: "Format | FormatMap") -> "FormatMap":
        return formats if isinstance(formats, FormatMap) else cls(formats)

    @property
    def uniform(self) -> bool:
        return self._rule is None

    def __call__(self, path: str, shape: tuple[int, ...]) -> Format:
        return self.default if self._rule is None else self._rule(path, tuple(int(s) for s in shape))

    def for_layer(self, prefix: str, shapes: Mapping[str, tuple[int, ...]]) -> Formats:
        """What a method gets for one layer: the default Format when uniform, else {linear: Format}."""
        if self._rule is None:
            return self.default
        return {n: self(f"{prefix}.{n}" if prefix else n, s) for n, s in shapes.items()}


def cached(make: Callable[[str], Format]) -> Callable[[str], Format]:
    """`make(name)` once per name, so equal answers are the same object."""
    made: dict[str, Format] = {}

    def get(name: str) -> Format:
        if name not in made:
            made[name] = make(name)
        return made[name]
    return get


def per_linear(fmt: Formats, names: Iterable[str]) -> dict[str, Format]:
    """{name: Format} for the named linears from one Format or a mapping."""
    names = list(names)
    if isinstance(fmt, Format):
        return {n: fmt for n in names}
    missing = [n for n in names if n not in fmt]
    if missing:
        raise LowbitError(f"no format given for linear(s) {', '.join(missing)}")
    return {n: fmt[n] for n in names}
