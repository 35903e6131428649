"""lowbit: make large language models small without making them dumb."""
__version__ = "0.1.0"

from .api import evaluate, fetch, quantize  # noqa: E402

__all__ = ["__version__", "evaluate", "fetch", "quantize"]
