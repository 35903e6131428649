"""Where weights come from: a local checkpoint dir, a .gguf file, or a hub id.

Everything becomes a directory of config + tokenizer + safetensors, read lazily tensor by
tensor, so no more than the tensors in flight are ever in memory. Pickled weights are refused.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import LowbitError
from ..paths import cache_dir, atomic_dir

log = logging.getLogger(__name__)

_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.jinja", "*.txt"]


def resolve_model_dir(model_path: str) -> Path:
    """A local directory holding config.json and safetensors weights for `model_path`."""
    p = Path(model_path).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return gguf_to_checkpoint(p)
    if p.is_dir():
        _check_checkpoint_dir(p)
        return p
    if p.exists():
        raise LowbitError(f"model path {p} is neither a checkpoint directory nor a .gguf file")
    if _looks_like_hub_id(model_path):
        return download_from_hub(model_path)
    raise LowbitError(f"model path {model_path} does not exist; give a checkpoint dir, a .gguf file or a hub id "
                      "(or run `lowbit fetch smollm2-135m`)")


def _looks_like_hub_id(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not s.startswith((".", "/", "~"))


def _check_checkpoint_dir(p: Path) -> None:
    if not (p / "config.json").is_file():
        raise LowbitError(f"{p} has no config.json; point --model-path at a Hugging Face checkpoint directory")
    if not list(p.glob("*.safetensors")):
        if list(p.glob("*.bin")) or list(p.glob("*.pt")):
            raise LowbitError(f"{p} holds only pickled weights (.bin/.pt), which lowbit never unpickles; "
                              "convert them to safetensors first")
        raise LowbitError(f"{p} has no *.safetensors weights")


def download_from_hub(repo_id: str) -> Path:
    """Snapshot a hub repository (safetensors, config, tokenizer only) into the HF cache."""
    from huggingface_hub import snapshot_download
    try:
        path = Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS))
    except Exception as e:  # the hub client raises many types; all mean "could not fetch"
        raise LowbitError(f"could not download {repo_id} from the hub ({type(e).__name__}: {e}); "
                          "check the id and your network, or pass a local directory") from e
    _check_checkpoint_dir(path)
    return path


def gguf_to_checkpoint(gguf_path: Path) -> Path:
    """Dequantize a .gguf file once into a cached fp32 safetensors checkpoint; return its dir."""
    st = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir("converted") / f"{gguf_path.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    log.info("converting %s to a safetensors checkpoint in %s", gguf_path.name, target)
    with atomic_dir(target) as tmp:
        save_gguf_as_checkpoint(gguf_path, tmp)
    return target


def save_gguf_as_checkpoint(gguf_path: Path, out_dir: Path) -> None:
    """Load a GGUF through transformers (dequantized to fp32) and save an ordinary checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except Exception as e:
        raise LowbitError(f"could not read GGUF {gguf_path} ({type(e).__name__}: {e})") from e
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)


class WeightStore:
    """Lazy, read-only access to the tensors of a safetensors checkpoint (sharded or not)."""

    def __init__(self, model_dir: Path):
        self.dir = Path(model_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            weight_map = {}
            for f in sorted(self.dir.glob("*.safetensors")):
                with safe_open(f, framework="pt") as h:
                    weight_map.update({k: f.name for k in h.keys()})
        self.weight_map: dict[str, str] = weight_map

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def _file(self, name: str) -> Path:
        try:
            return self.dir / self.weight_map[name]
        except KeyError:
            raise LowbitError(f"tensor {name} is missing from {self.dir}; the checkpoint is incomplete") from None

    # Each read opens the file anew: a mapping kept open would keep every page it touched
    # resident, and peak memory would grow to the model's size.
    def get(self, name: str) -> torch.Tensor:
        with safe_open(self._file(name), framework="pt") as h:
            return h.get_tensor(name)

    def rows(self, name: str, index: torch.Tensor) -> torch.Tensor:
        """Rows `index` (sorted, unique) of a 2-D tensor, read from the file without mapping it, so
        memory holds those rows only (an embedding's used tokens, not its whole vocabulary)."""
        path = self._file(name)
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            info = json.loads(f.read(header_len))[name]
            dtype, (n_rows, n_cols) = _DTYPES[info["dtype"]], info["shape"]
            row_bytes = n_cols * dtype.itemsize
            base = 8 + header_len + info["data_offsets"][0]
            out = bytearray(len(index) * row_bytes)
            idx = index.tolist()
            k = 0
            while k < len(idx):  # one read per run of consecutive rows
                end = k
                while end + 1 < len(idx) and idx[end + 1] == idx[end] + 1:
                    end += 1
                if not 0 <= idx[k] <= idx[end] < n_rows:
                    raise LowbitError(f"row {idx[end]} is outside {name} ({n_rows} rows)")
                f.seek(base + idx[k] * row_bytes)
                f.readinto(memoryview(out)[k * row_bytes:(end + 1) * row_bytes])
                k = end + 1
        return torch.frombuffer(out, dtype=dtype).reshape(len(idx), n_cols) if idx else \
            torch.empty(0, n_cols, dtype=dtype)

    def shape(self, name: str) -> tuple[int, ...]:
        with safe_open(self._file(name), framework="pt") as h:
            return tuple(h.get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        with safe_open(self._file(name), framework="pt") as h:
            return _DTYPES[h.get_slice(name).get_dtype()]

    def with_prefix(self, prefix: str) -> list[str]:
        return [k for k in self.weight_map if k.startswith(prefix)]


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def copy_aux_files(src: Path, dst: Path) -> None:
    """Tokenizer, generation config and chat template: everything but weights and config.json."""
    for f in src.iterdir():
        if f.is_file() and f.name != "config.json" and not f.name.endswith((".safetensors", ".bin", ".pt")) \
                and f.name != "model.safetensors.index.json" and f.name != "lowbit.json":
            shutil.copy2(f, dst / f.name)


def model_size_bytes(model_dir: Path) -> int:
    return sum(os.path.getsize(f) for f in Path(model_dir).glob("*.safetensors"))
