"""What goes into lowbit.json besides the recipe: versions, memory, checksums."""
from __future__ import annotations

import hashlib
import platform
import resource
import sys
from importlib import metadata
from pathlib import Path

import torch


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("lowbit", "torch", "transformers", "safetensors", "compressed-tensors", "gguf"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB, macOS bytes)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def peak_memory(device: torch.device) -> dict[str, int]:
    out = {"rss_bytes": peak_rss_bytes()}
    if device.type == "cuda":
        out["cuda_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return out


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def checksums(directory: Path) -> dict[str, str]:
    return {f.name: sha256_file(f) for f in sorted(Path(directory).iterdir()) if f.is_file()}
