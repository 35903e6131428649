"""llama.cpp importance-matrix files: read and write, no model code.

Two on-disk formats (tools/imatrix/imatrix.cpp, tools/quantize/quantize.cpp):

legacy ``.dat`` (little-endian):
  int32 n_entries
  n_entries × { int32 name_len, name bytes, int32 ncall, int32 nval, float32[nval] values }
  int32 last_chunk, int32 dataset_len, dataset bytes        (trailer; old files end before it)
  values are mean(x²) per input column times ncall; llama-quantize divides by ncall.

GGUF (``general.type = "imatrix"``):
  tensors  <name>.in_sum2  F32 [n_mat, n]   sums of x² per column (per expert matrix)
           <name>.counts   F32 [n_mat, 1]   rows (tokens) summed
           <name>.in_sum   F32 [n_mat, n]   sums of x (optional, newer files)
  keys     imatrix.datasets [str], imatrix.chunk_count u32, imatrix.chunk_size u32
  llama-quantize uses in_sum2 / counts (1 where a matrix saw no data).

Both load into `Imatrix`; `importance(name)` is what llama-quantize hands to the quantizer.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...errors import LowbitError

GGUF_MAGIC = b"GGUF"


@dataclass
class ImatrixEntry:
    """Statistics of one weight's inputs: in_sum2 [n_mat, n] and counts [n_mat] (float32)."""

    in_sum2: np.ndarray
    counts: np.ndarray
    in_sum: np.ndarray | None = None

    def __post_init__(self):
        self.in_sum2 = np.asarray(self.in_sum2, dtype=np.float32).reshape(len(np.atleast_1d(self.counts)), -1)
        self.counts = np.asarray(self.counts, dtype=np.float32).reshape(-1)
        if self.in_sum is not None:
            self.in_sum = np.asarray(self.in_sum, dtype=np.float32).reshape(self.in_sum2.shape)


@dataclass
class Imatrix:
    """An importance matrix. chunk_size is in tokens (1 for legacy files, whose counts are calls)."""

    entries: dict[str, ImatrixEntry] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 1

    def importance(self, name: str) -> np.ndarray:
        """Mean x² per input column, as llama-quantize passes it as quant_weights: [n] for a dense
        weight, [n_mat, n] for stacked experts; matrices that saw no data get 1."""
        e = self.entries[name]
        c = e.counts[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            imp = np.where(c > 0, e.in_sum2 / np.where(c > 0, c, 1), np.float32(1)).astype(np.float32)
        return imp[0] if imp.shape[0] == 1 else imp


# -- legacy .dat ------------------------------------------------------------------------------

def read_dat(path: str | Path) -> Imatrix:
    """A legacy imatrix file; entries keep the stored values (mean·ncall) with counts = ncall."""
    data = Path(path).read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise LowbitError(f"{path}: truncated imatrix file (at byte {pos})")
        out = struct.unpack_from(fmt, data, pos)
        pos += size
        return out

    (n_entries,) = take("<i")
    if n_entries < 1:
        raise LowbitError(f"{path}: no entries; not a llama.cpp imatrix file")
    im = Imatrix()
    for _ in range(n_entries):
        (name_len,) = take("<i")
        if name_len <= 0:
            raise LowbitError(f"{path}: bad entry name length {name_len}")
        name = take(f"<{name_len}s")[0].decode("utf-8")
        ncall, nval = take("<ii")
        if nval < 1:
            raise LowbitError(f"{path}: entry {name!r} has {nval} values")
        values = np.frombuffer(data, dtype="<f4", count=nval, offset=pos).astype(np.float32)
        pos += 4 * nval
        # ncall 0: llama-quantize uses the values as they are, which counts = 1 reproduces
        im.entries[name] = ImatrixEntry(values[None], np.array([ncall if ncall > 0 else 1], np.float32))
    if pos + 8 <= len(data):
        (im.chunk_count,) = take("<i")
        (ds_len,) = take("<i")
        if ds_len > 0:
            im.datasets = [take(f"<{ds_len}s")[0].decode("utf-8", errors="replace")]
    return im


def write_dat(im: Imatrix, path: str | Path) -> None:
    """Write the legacy format (what `llama-imatrix --output-format dat` writes)."""
    out = [struct.pack("<i", len(im.entries))]
    for name in sorted(im.entries):
        e = im.entries[name]
        ncall = max(1, math.ceil(float(e.counts.max()) / im.chunk_size)) if e.counts.size else 0
        rows = []
        for s, c in zip(e.in_sum2, e.counts):
            if c == 0:                                   # partial data: llama.cpp stores 1 per call
                rows.append(np.full_like(s, np.float32(ncall)))
            elif im.chunk_size == 1 and c == ncall:      # counts are calls: keep the stored values exactly
                rows.append(s)
            else:
                rows.append((s / np.float32(c)) * np.float32(ncall))
        values = np.concatenate(rows).astype("<f4")
        raw = name.encode("utf-8")
        out += [struct.pack("<i", len(raw)), raw, struct.pack("<ii", ncall, values.size), values.tobytes()]
    ds = (im.datasets[-1] if im.datasets else "").encode("utf-8")
    out += [struct.pack("<ii", im.chunk_count, len(ds)), ds]
    Path(path).write_bytes(b"".join(out))


# -- GGUF -------------------------------------------------------------------------------------

def read_gguf(path: str | Path) -> Imatrix:
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    im = Imatrix()
    f = r.fields.get("imatrix.datasets")
    if f is not None:
        im.datasets = [bytes(f.parts[i]).decode("utf-8") for i in f.data]
    for key, attr in (("imatrix.chunk_count", "chunk_count"), ("imatrix.chunk_size", "chunk_size")):
        f = r.fields.get(key)
        if f is not None:
            setattr(im, attr, int(f.parts[f.data[0]][0]))
    parts: dict[str, dict[str, np.ndarray]] = {}
    for t in r.tensors:
        for suffix in (".in_sum2", ".counts", ".in_sum"):
            if t.name.endswith(suffix):
                parts.setdefault(t.name[: -len(suffix)], {})[suffix] = np.array(t.data, dtype=np.float32)
                break
    for name, p in parts.items():
        if ".in_sum2" not in p or ".counts" not in p:
            raise LowbitError(f"{path}: tensor {name!r} lacks in_sum2 or counts")
        counts = p[".counts"].reshape(-1)
        im.entries[name] = ImatrixEntry(p[".in_sum2"].reshape(counts.size, -1), counts, p.get(".in_sum"))
    if not im.entries:
        raise LowbitError(f"{path}: no imatrix tensors")
    return im


def write_gguf(im: Imatrix, path: str | Path) -> None:
    """Write the GGUF format (what `llama-imatrix` writes by default)."""
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), arch="imatrix")
    w.kv_data[0].pop("general.architecture", None)  # llama.cpp's imatrix files carry no architecture
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", list(im.datasets))
    w.add_uint32("imatrix.chunk_count", im.chunk_count)
    w.add_uint32("imatrix.chunk_size", im.chunk_size)
    for name in sorted(im.entries):
        e = im.entries[name]
        w.add_tensor(f"{name}.in_sum2", np.ascontiguousarray(e.in_sum2, dtype=np.float32))
        w.add_tensor(f"{name}.counts", np.ascontiguousarray(e.counts.reshape(-1, 1), dtype=np.float32))
        if e.in_sum is not None:
            w.add_tensor(f"{name}.in_sum", np.ascontiguousarray(e.in_sum, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def read_imatrix(path: str | Path) -> Imatrix:
    """Either format, told apart by the GGUF magic (as llama-quantize does)."""
    with open(path, "rb") as fh:
        magic = fh.read(4)
    return read_gguf(path) if magic == GGUF_MAGIC else read_dat(path)
