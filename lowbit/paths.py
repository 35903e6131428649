"""Cache locations and atomic directory writes."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import Iterator

from .errors import LowbitError


def cache_dir(*parts: str) -> Path:
    """~/.cache/lowbit/<parts> (or $LOWBIT_CACHE), created on demand."""
    root = Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit"))
    d = root.joinpath(*parts)
    d.mkdir(parents=True, exist_ok=True)
    return d


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; rename it to `target` only if the block succeeds."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with disk_full_as_error(target):
            yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def disk_full_as_error(where: Path) -> Iterator[None]:
    """Turn ENOSPC/EDQUOT into a one-line LowbitError naming the place that filled up."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise LowbitError(f"disk full while writing {where}; free space or choose another --output-dir") from e
        raise


def publish_dir(tmp: Path, target: Path) -> None:
    """Atomically replace `target` by `tmp` (the old target, if any, is removed only after the swap)."""
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
