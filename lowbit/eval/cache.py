"""The base model's logits on the evaluation windows, computed once and kept on disk.

Scoring N candidates against one base then costs N forward passes instead of 2N, and a later
run with the same base, text, context and windows costs none for the base.

Storage decision: full-vocab log-probabilities in float16 shift the mean KLD by 1e-4 to 1e-2
relative on realistic logits (bfloat16: up to 0.3; see `kld_storage_error`), and float32 logits
cost ctx × vocab × 4 bytes a window (4 GiB for 40 windows of SmolLM2, 10 GiB for a 128k vocabulary).
So the cache keeps the base's final hidden states in float32 (ctx × hidden × 4 bytes: 100–200×
smaller) plus its output head once, and rebuilds exact float32 logits with `BaseHead` — the same
function the uncached path uses, so both give identical figures.

Layout of ``<root>/<key>/``:
  meta.json                 what the key stands for (base, text, ctx, windows, head)
  windows.safetensors       ids    int64   [n_windows, ctx]
  head.safetensors          weight float32 [vocab, hidden] (+ bias [vocab])
  hidden-00000.safetensors  hidden float32 [ctx, hidden]   (one file per window)

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
from ..provenance import sha256_file

log = logging.getLogger(__name__)

CACHE_VERSION = 2
_HASHED_FILES = ("config.json", "*.safetensors")


# -- keys ---------------------------------------------------------------------------------------
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
            memo[tag] = sha256_file(f)
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


# -- the head -----------------------------------------------------------------------------------
class BaseHead:
    """Logits from final hidden states: lm_head (+ bias), then Gemma's soft-capping if configured.

    Shapes: hidden [..., hidden] -> logits [..., vocab] float32.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, softcap: float | None = None):
        self.weight, self.bias, self.softcap = weight.float(), None if bias is None else bias.float(), softcap

    @classmethod
    def of(cls, model) -> "BaseHead":
        head = model.get_output_embeddings()
        softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
        return cls(head.weight.detach(), None if head.bias is None else head.bias.detach(), softcap)

    def to(self, device) -> "BaseHead":
        return BaseHead(self.weight.to(device), None if self.bias is None else self.bias.to(device), self.softcap)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = torch.nn.functional.linear(hidden.float(), self.weight, self.bias)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def final_hidden(model, ids: torch.Tensor, check: bool = False) -> torch.Tensor:
    """The base's final hidden states for `ids` [b, ctx] -> [b, ctx, hidden] float32.

    With `check`, refuse a model whose own logits are not `BaseHead` of these hidden states
    (an architecture with extra output scaling), since the cache could not reproduce them.
    """
    hidden = model.get_decoder()(input_ids=ids).last_hidden_state.float()
    if check:
        ref = model(input_ids=ids[:1]).logits.float()
        got = BaseHead.of(model)(hidden[:1])
        if not torch.allclose(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max())):
            raise LowbitError(f"{type(model).__name__}'s logits are not its output head applied to its final "
                              "hidden states; lowbit cannot evaluate this architecture against a base yet")
    return hidden


# -- the cache ----------------------------------------------------------------------------------
class BaseLogitsCache:
    """Read access to one cached set of base hidden states (see the module docstring for the layout)."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.meta = json.loads((self.dir / "meta.json").read_text())
        with safe_open(self.dir / "windows.safetensors", framework="pt") as f:
            self.windows = f.get_tensor("ids")
        with safe_open(self.dir / "head.safetensors", framework="pt") as f:
            self.head = BaseHead(f.get_tensor("weight"), f.get_tensor("bias") if "bias" in f.keys() else None,
                                 self.meta.get("softcap"))

    @staticmethod
    def is_complete(directory: Path) -> bool:
        d = Path(directory)
        if not (d / "meta.json").is_file():
            return False
        meta = json.loads((d / "meta.json").read_text())
        if meta.get("version") != CACHE_VERSION:
            return False
        return (d / "head.safetensors").is_file() and all(
            (d / _hidden_name(i)).is_file() for i in range(meta.get("n_windows", -1)))

    def hidden(self, i: int) -> torch.Tensor:
        """Final hidden states of window i. Shapes: -> [ctx, hidden] float32."""
        with safe_open(self.dir / _hidden_name(i), framework="pt") as f:
            return f.get_tensor("hidden")

    def logits_batch(self, rows: Iterable[int], device="cpu") -> torch.Tensor:
        """Base logits of the given windows. Shapes: -> [len(rows), ctx, vocab] float32."""
        return self.head.to(device)(torch.stack([self.hidden(i) for i in rows]).to(device))

    @property
    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.dir.iterdir() if f.is_file())


def _hidden_name(i: int) -> str:
    return f"hidden-{i:05d}.safetensors"


def build_cache(directory: Path, windows: torch.Tensor, model, batch_size: int, meta: dict,
                progress: Callable[[Iterable], Iterable] = lambda x: x, device="cpu") -> BaseLogitsCache:
    """Run the base `model` on `windows` batch by batch and write the cache atomically to `directory`.

    Shapes: windows [n, ctx] int64.
    """
    n = int(windows.shape[0])
    head = BaseHead.of(model)
    with atomic_dir(directory) as tmp:
        save_file({"ids": windows.contiguous()}, tmp / "windows.safetensors")
        save_file({"weight": head.weight.cpu().contiguous(),
                   **({} if head.bias is None else {"bias": head.bias.cpu().contiguous()})}, tmp / "head.safetensors")
        for start in progress(range(0, n, batch_size)):
            hidden = final_hidden(model, windows[start:start + batch_size].to(device), check=start == 0).cpu()
            for j in range(hidden.shape[0]):
                save_file({"hidden": hidden[j].contiguous()}, tmp / _hidden_name(start + j))
        (tmp / "meta.json").write_text(json.dumps(
            {**meta, "version": CACHE_VERSION, "n_windows": n, "ctx": int(windows.shape[1]),
             "vocab": int(head.weight.shape[0]), "softcap": head.softcap, "dtype": "float32"}, indent=2))
    return BaseLogitsCache(directory)


def open_or_build(root: Path, key: str, windows: torch.Tensor, model_factory: Callable[[], object],
                  batch_size: int, meta: dict, progress=lambda x: x, device="cpu") -> tuple[BaseLogitsCache, bool]:
    """The cache for `key` under `root`, built with the model `model_factory()` loads if absent or stale.

    Returns (cache, hit). `model_factory` is called only on a miss, so the base model is loaded
    only when its hidden states are not on disk yet.
    """
    d = Path(root) / key
    if BaseLogitsCache.is_complete(d):
        cache = BaseLogitsCache(d)
        if torch.equal(cache.windows, windows):
            log.info("base logits from cache %s", d)
            return cache, True
        log.warning("cache %s holds other windows than its key promises; rebuilding it", d)
    log.info("computing base hidden states once into %s", d)
    return build_cache(d, windows, model_factory(), batch_size, meta, progress, device), False


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
