"""Text sources and the token windows cut from them.

Embedded (public domain, shipped in the package so everything runs offline):
  ``default`` / ``sotu``   State of the Union addresses 1993–2016 — calibration.
  ``moby-dick``            Moby Dick, chapters 1–42 — held-out evaluation.
Local ``.txt`` / ``.jsonl`` (a "text" field per line) files, and hub datasets by name
(``wikitext2``, ``wikitext2-simple``, ``c4``) through the `datasets` library.
"""
from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from ..errors import LowbitError

EMBEDDED = {
    "default": "sotu_1993_2016.txt.gz",
    "sotu": "sotu_1993_2016.txt.gz",
    "moby-dick": "moby_dick_ch1_42.txt.gz",
}

# name -> (datasets path, config, calibration split, evaluation split, field, data_files)
HUB = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "train", "test", "text", None),
    "wikitext2-simple": ("wikitext", "wikitext-2-raw-v1", "train", "test", "text", None),
    "c4": ("allenai/c4", None, "train", "validation", "text",
           {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"}),
}


@dataclass(frozen=True)
class TextSource:
    """A body of text and a fingerprint that identifies it (to keep calibration and eval apart)."""

    name: str
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


def load_text(source: str, split: str = "calibration") -> TextSource:
    """Resolve `source` (embedded name, file path or hub dataset name) to its text."""
    if source in EMBEDDED:
        data = resources.files("lowbit.data").joinpath("texts", EMBEDDED[source]).read_bytes()
        return TextSource(source, gzip.decompress(data).decode("utf-8"))
    p = Path(source).expanduser()
    if p.is_file():
        return TextSource(str(p), _read_file(p))
    if source in HUB:
        return TextSource(f"{source}:{split}", _load_hub(source, split))
    raise LowbitError(f"text source {source!r} not found; give a .txt/.jsonl file, one of "
                      f"{', '.join(EMBEDDED)} (embedded) or {', '.join(HUB)} (hub datasets)")


def _read_file(p: Path) -> str:
    try:
        raw = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LowbitError(f"cannot read text file {p} ({e}); give a UTF-8 .txt or .jsonl file") from e
    if p.suffix == ".jsonl":
        texts = []
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                texts.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise LowbitError(f"{p}:{i} is not a JSON object with a \"text\" field") from None
        return "\n\n".join(texts)
    return raw


def _load_hub(name: str, split: str) -> str:
    try:
        import datasets
    except ImportError:
        raise LowbitError(f"dataset {name!r} needs the `datasets` package: pip install 'lowbit[hub]'") from None
    path, config, calib_split, eval_split, field, files = HUB[name]
    hub_split = calib_split if split == "calibration" else eval_split
    try:
        kwargs = {"data_files": {hub_split: files[hub_split]}} if files else {}
        ds = datasets.load_dataset(path, config, split=hub_split, **kwargs)
    except Exception as e:  # datasets raises many types for "not reachable"
        raise LowbitError(f"could not load hub dataset {name!r} ({type(e).__name__}: {e}); "
                          "use a local .txt/.jsonl file instead") from e
    rows = list(ds[field])
    if name == "wikitext2-simple":  # paragraphs only: no section headings, no blank lines
        rows = [r for r in rows if r.strip() and not r.strip().startswith("=")]
    return "\n\n".join(rows)  # GPTQ's convention for wikitext


def _tokens(tokenizer, text: str) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]


def calibration_ids(tokenizer, source: TextSource, n: int, seq_len: int, seed: int) -> torch.Tensor:
    """`n` windows of `seq_len` tokens at random offsets, deterministic for `seed`.

    Shapes: -> [n, seq_len] int64.
    """
    ids = _tokens(tokenizer, source.text)
    if len(ids) < seq_len + 1:
        raise LowbitError(f"calibration text {source.name} has {len(ids)} tokens, fewer than --seq-len {seq_len}; "
                          "give more text or a shorter --seq-len")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len, (n,), generator=g)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


def eval_windows(tokenizer, source: TextSource, ctx: int, n_windows: int | None) -> torch.Tensor:
    """Consecutive non-overlapping windows of `ctx` tokens from the start of the text.

    Shapes: -> [n_windows, ctx] int64.
    """
    ids = _tokens(tokenizer, source.text)
    available = len(ids) // ctx
    if available == 0:
        raise LowbitError(f"evaluation text {source.name} has {len(ids)} tokens, fewer than --ctx {ctx}")
    n = available if n_windows is None else min(n_windows, available)
    return ids[: n * ctx].reshape(n, ctx)
