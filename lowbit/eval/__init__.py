"""Evaluation: KLD to the base model, perplexity, top-1 agreement."""
from .evaluate import EvalResult, evaluate, format_table
from .metrics import TokenStats, summarize, token_stats

__all__ = ["EvalResult", "TokenStats", "evaluate", "format_table", "summarize", "token_stats"]
