"""Method registry: a new method is one file in this package plus one line in ``METHODS``."""
from __future__ import annotations

from typing import Any

from ..errors import LowbitError
from .base import LayerResult, Method
from .gptq import AWQGPTQ, GPTQ
from .awq import AWQ
from .awq_joint import AWQJoint
from .dh_awq import DHAWQ
from .rtn import RTN

METHODS: dict[str, type[Method]] = {
    RTN.name: RTN,
    AWQ.name: AWQ,
    DHAWQ.name: DHAWQ,
    AWQJoint.name: AWQJoint,
    GPTQ.name: GPTQ,
    AWQGPTQ.name: AWQGPTQ,
}


def make_method(name: str, options: dict[str, Any] | None = None) -> Method:
    try:
        cls = METHODS[name]
    except KeyError:
        raise LowbitError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}") from None
    return cls(**(options or {}))


__all__ = ["METHODS", "LayerResult", "Method", "make_method"]
