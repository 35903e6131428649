"""lowbit: make large language models small without making them dumb."""
__version__ = "0.1.0"

from .api import evaluate, fetch, quantize  # noqa: E402

__all__ = ["__version__", "evaluate", "fetch", "load", "quantize"]


def load(path, device="cpu", dtype=None):
    """A lowbit checkpoint as a transformers model with packed INT4 layers (see lowbit.runtime.load)."""
    from .runtime import load as run
    return run(path, device=device, dtype=dtype)
