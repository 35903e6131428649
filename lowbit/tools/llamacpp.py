"""llama.cpp's command-line tools (llama-quantize, llama-perplexity, llama-imatrix), built once.

There is no usable binary package, so the tools are built from the llama.cpp vendored in the
llama-cpp-python source distribution (../shared/RESOURCES.md), cached under
``<cache>/llama.cpp/llama_cpp_python-<VERSION>/vendor/llama.cpp/build/bin`` (about 7 minutes on
2 cores, once). `ensure_llama_cpp(bin_dir=...)` uses an existing build instead (the CLI or a test
passes e.g. $LOWBIT_LLAMA_CPP_BIN). Concurrent callers wait on a file lock; nothing is half-built
in place of a finished build, because a build counts as done only when every tool exists.

``python -m lowbit.tools.llamacpp`` builds (if needed) and prints the bin directory.
"""
from __future__ import annotations

import fcntl
import logging
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from ..errors import LowbitError

log = logging.getLogger(__name__)

VERSION = "0.3.36"  # llama-cpp-python sdist whose vendor/llama.cpp is built
TOOLS = ("llama-quantize", "llama-perplexity", "llama-imatrix")
CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF",
               "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=ON", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=OFF")


def source_dir(root: Path) -> Path:
    return Path(root) / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"


def _complete(bin_dir: Path) -> bool:
    return all((bin_dir / t).is_file() for t in TOOLS)


def _run(cmd: list[str], log_file: Path, cwd: Path | None = None) -> None:
    with open(log_file, "a") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        r = subprocess.run(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    if r.returncode:
        raise LowbitError(f"building llama.cpp failed at `{' '.join(cmd[:4])} ...` (exit {r.returncode}); "
                          f"see {log_file}")


def build(root: Path, jobs: int = 2) -> Path:
    """Download the sdist and build the tools under `root` (the caller holds the lock)."""
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise LowbitError(f"building llama.cpp needs `{tool}`, which is not installed; install it "
                              "(e.g. apt-get install cmake g++) or pass an existing build's bin directory")
    root.mkdir(parents=True, exist_ok=True)
    log_file = root / "build.log"
    sdist = root / f"llama_cpp_python-{VERSION}.tar.gz"
    if not sdist.is_file():
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
              f"llama-cpp-python=={VERSION}", "-d", str(root)], log_file)
    src = source_dir(root)
    if not (src / "CMakeLists.txt").is_file():
        with tarfile.open(sdist) as tar:
            tar.extractall(root, filter="data")
    _run(["cmake", "-S", ".", "-B", "build", *CMAKE_FLAGS], log_file, cwd=src)
    _run(["cmake", "--build", "build", f"-j{jobs}", "--target", *TOOLS], log_file, cwd=src)
    return src / "build" / "bin"


def ensure_llama_cpp(cache_root: Path | None = None, bin_dir: Path | None = None, jobs: int = 2) -> Path:
    """The directory holding llama-quantize / llama-perplexity / llama-imatrix, building it if needed.

    `bin_dir`: use this existing build (error if a tool is missing). `cache_root`: the lowbit cache
    (default ~/.cache/lowbit or $LOWBIT_CACHE through lowbit.paths.cache_dir).
    """
    if bin_dir is not None:
        bin_dir = Path(bin_dir).expanduser()
        if not _complete(bin_dir):
            raise LowbitError(f"{bin_dir} lacks one of {', '.join(TOOLS)}; point it at llama.cpp's build/bin")
        return bin_dir
    if cache_root is None:
        from ..paths import cache_dir
        root = cache_dir("llama.cpp")
    else:
        root = Path(cache_root) / "llama.cpp"
        root.mkdir(parents=True, exist_ok=True)
    built = source_dir(root) / "build" / "bin"
    if _complete(built):
        return built
    with open(root / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building; wait for it
        if not _complete(built):
            log.info("building llama.cpp %s tools in %s (several minutes, once)", VERSION, root)
            built = build(root, jobs)
    if not _complete(built):
        raise LowbitError(f"llama.cpp build in {root} finished without {', '.join(TOOLS)}; see {root}/build.log")
    return built


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    try:
        print(ensure_llama_cpp())
    except LowbitError as e:
        print(f"lowbit: error: {e}", file=sys.stderr)
        sys.exit(2)
