"""The base model's logits on the evaluation windows, computed once and kept on disk.

Scoring N candidates against one base then costs N forward passes instead of 2N, and a later
run with the same base, text, context and windows costs none for the base.

Storage decision (measured, see `kld_storage_error` and tests/test_eval_tools.py): full-vocab
log-probabilities in float16 shift the mean KLD by 1e-4 to 1e-2 relative on realistic logits
(bfloat16: up to 0.3) — the rounding step of a log-prob near 0 is already ~1e-4 nats, the size of
a good 8-bit model's whole KLD. Only float32 meets the < 1e-4 requirement, so the cache holds
float32 logits, one safetensors file per window, and candidates score bit-for-bit as if the base
had been run alongside them.

Layout of ``<root>/<key>/``:
  meta.json                 what the key stands for (base, text, ctx, windows, vocab)
  windows.safetensors       ids   int64   [n_windows, ctx]
  logits-00000.safetensors  logits float32 [ctx, vocab]   (one file per window)

The key hashes the base checkpoint's content (config and weights), the text's sha256, ctx and the
exact token ids of the windows (so a tokenizer change is a different key).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import LowbitError
from ..paths import atomic_dir

log = logging.getLogger(__name__)

CACHE_VERSION = 1
_HASHED_FILES = ("config.json", "*.safetensors")


# -- keys ---------------------------------------------------------------------------------------
def _sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def checkpoint_hash(model_dir: Path, memo_file: Path | None = None) -> str:
    """sha256 over the content of config.json and every safetensors file of `model_dir`.

    Hashing a large checkpoint takes a while, so each file's digest is memoized in `memo_file`
    under (resolved path, size, mtime): a file that changes gets hashed again.
    """
    model_dir = Path(model_dir)
    files = sorted({f for pat in _HASHED_FILES for f in model_dir.glob(pat) if f.is_file()})
    if not files:
        raise LowbitError(f"{model_dir} has no config.json or safetensors to identify the base model by")
    memo: dict[str, str] = {}
    if memo_file is not None and memo_file.is_file():
        try:
            memo = json.loads(memo_file.read_text())
        except json.JSONDecodeError:
            memo = {}
    h = hashlib.sha256()
    changed = False
    for f in files:
        st = f.stat()
        tag = f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        if tag not in memo:
            memo[tag] = _sha256_file(f)
            changed = True
        h.update(f"{f.name}:{memo[tag]}\n".encode())
    if memo_file is not None and changed:
        tmp = memo_file.with_name(f".{memo_file.name}.{os.getpid()}")
        tmp.write_text(json.dumps(memo, indent=1))
        os.replace(tmp, memo_file)
    return h.hexdigest()


def cache_key(base_hash: str, text_sha: str, ctx: int, windows: torch.Tensor) -> str:
    """Key of one (base, text, ctx, windows) combination. Shapes: windows [n_windows, ctx] int64."""
    ids_sha = hashlib.sha256(windows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()
    blob = json.dumps({"v": CACHE_VERSION, "base": base_hash, "text": text_sha, "ctx": ctx,
                       "n": int(windows.shape[0]), "ids": ids_sha}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


# -- the cache ----------------------------------------------------------------------------------
class BaseLogitsCache:
    """Read access to one cached set of base logits (see the module docstring for the layout)."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.meta = json.loads((self.dir / "meta.json").read_text())
        with safe_open(self.dir / "windows.safetensors", framework="pt") as f:
            self.windows = f.get_tensor("ids")

    @staticmethod
    def is_complete(directory: Path) -> bool:
        d = Path(directory)
        if not (d / "meta.json").is_file():
            return False
        n = json.loads((d / "meta.json").read_text()).get("n_windows", -1)
        return all((d / _logits_name(i)).is_file() for i in range(n))

    def logits(self, i: int) -> torch.Tensor:
        """Base logits of window i. Shapes: -> [ctx, vocab] float32."""
        with safe_open(self.dir / _logits_name(i), framework="pt") as f:
            return f.get_tensor("logits")

    def logits_batch(self, rows: Iterable[int]) -> torch.Tensor:
        return torch.stack([self.logits(i) for i in rows])

    @property
    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.dir.iterdir() if f.is_file())


def _logits_name(i: int) -> str:
    return f"logits-{i:05d}.safetensors"


def build_cache(directory: Path, windows: torch.Tensor, forward: Callable[[torch.Tensor], torch.Tensor],
                batch_size: int, meta: dict, progress: Callable[[Iterable], Iterable] = lambda x: x
                ) -> BaseLogitsCache:
    """Run `forward` on `windows` batch by batch and write the cache atomically to `directory`.

    Shapes: windows [n, ctx] int64; forward(ids [b, ctx]) -> logits [b, ctx, vocab].
    """
    n = int(windows.shape[0])
    with atomic_dir(directory) as tmp:
        save_file({"ids": windows.contiguous()}, tmp / "windows.safetensors")
        vocab = None
        for start in progress(range(0, n, batch_size)):
            logits = forward(windows[start:start + batch_size]).float().cpu()
            vocab = int(logits.shape[-1])
            for j in range(logits.shape[0]):
                save_file({"logits": logits[j].contiguous()}, tmp / _logits_name(start + j))
        (tmp / "meta.json").write_text(json.dumps(
            {**meta, "version": CACHE_VERSION, "n_windows": n, "ctx": int(windows.shape[1]),
             "vocab": vocab, "dtype": "float32"}, indent=2))
    return BaseLogitsCache(directory)


def open_or_build(root: Path, key: str, windows: torch.Tensor, forward_factory: Callable[[], Callable],
                  batch_size: int, meta: dict, progress=lambda x: x) -> tuple[BaseLogitsCache, bool]:
    """The cache for `key` under `root`, built with `forward_factory()` if absent or stale.

    Returns (cache, hit). `forward_factory` is called only on a miss, so the base model is loaded
    only when its logits are not on disk yet.
    """
    d = Path(root) / key
    if BaseLogitsCache.is_complete(d):
        cache = BaseLogitsCache(d)
        if torch.equal(cache.windows, windows):
            log.info("base logits from cache %s", d)
            return cache, True
        log.warning("cache %s holds other windows than its key promises; rebuilding it", d)
    log.info("computing base logits once into %s", d)
    return build_cache(d, windows, forward_factory(), batch_size, meta, progress), False


# -- the storage decision, as a measurement ----------------------------------------------------
def kld_storage_error(base_logits: torch.Tensor, cand_logits: torch.Tensor, dtype: torch.dtype) -> float:
    """Relative error of the mean KLD(base ‖ cand) when the base log-probs are stored in `dtype`.

    Shapes: base_logits, cand_logits [T, V]. The reference is float64 math on float32 log-probs.
    """
    lp_b = torch.log_softmax(base_logits.double(), -1)
    lp_c = torch.log_softmax(cand_logits.double(), -1)
    exact = (lp_b.exp() * (lp_b - lp_c)).sum(-1).mean()
    stored = lp_b.to(dtype).double()
    approx = (stored.exp() * (stored - lp_c)).sum(-1).mean()
    return float((approx - exact).abs() / exact.abs().clamp(min=1e-30))
