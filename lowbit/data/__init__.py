"""Calibration and evaluation text: embedded defaults, local files, hub datasets."""
from .text import TextSource, calibration_ids, eval_windows, load_text

__all__ = ["TextSource", "calibration_ids", "eval_windows", "load_text"]
