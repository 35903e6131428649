"""Per-tensor error of a quantized checkpoint against its source, one tensor at a time.

Reads what lowbit writes: compressed-tensors ``pack-quantized`` (decoded with compressed-tensors'
own unpack helper), GPTQ v1 (``qweight``/``qzeros``/``scales``/``g_idx``), and plain or
fake-quantized float checkpoints. Other quantized layouts are refused, never guessed.

Pure functions (`tensor_error`, `decode_pack_quantized`, `decode_gptq`) take tensors; only
`CheckpointReader` and `inspect_checkpoint` touch files.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch

from ..errors import LowbitError
from ..model.source import WeightStore, resolve_model_dir

log = logging.getLogger(__name__)

OUTLIER_SIGMAS = 6.0
_CHUNK = 1 << 22  # elements per float64 reduction step


@dataclass(frozen=True)
class TensorError:
    name: str
    shape: tuple[int, ...]
    stored: str              # "pack-quantized", "gptq" or the float dtype
    bits_per_weight: float   # on-disk bits per element, metadata (scales, zeros, shapes) included
    cos: float
    rel_rms: float           # ‖W_r − W‖ / ‖W‖
    max_abs: float           # max |W_r − W|
    outliers: int            # elements of the source with |w − mean| > 6σ (σ, mean over the tensor)

    def to_json(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


# -- pure math ----------------------------------------------------------------------------------
def tensor_error(W: torch.Tensor, W_r: torch.Tensor) -> dict[str, float | int]:
    """cos, rel_rms, max_abs of W_r against W and the outlier count of W (|w − μ| > 6σ; for weight
    matrices μ ≈ 0, so this is |w| > 6σ; for norms centred near 1 it does not flag every entry).
    Reductions in float64, chunk by chunk.

    Shapes: W, W_r any shape, equal.
    """
    if W.shape != W_r.shape:
        raise LowbitError(f"shape mismatch: source {tuple(W.shape)} vs checkpoint {tuple(W_r.shape)}")
    a, b = W.reshape(-1), W_r.reshape(-1)
    dot = na = nb = nd = s1 = 0.0
    max_abs = 0.0
    for i in range(0, a.numel(), _CHUNK):
        x, y = a[i:i + _CHUNK].double(), b[i:i + _CHUNK].double()
        d = y - x
        dot += float(x @ y)
        na += float(x @ x)
        nb += float(y @ y)
        nd += float(d @ d)
        s1 += float(x.sum())
        if d.numel():
            max_abs = max(max_abs, float(d.abs().max()))
    n = max(a.numel(), 1)
    sigma = math.sqrt(max(na / n - (s1 / n) ** 2, 0.0))
    outliers = 0
    if sigma > 0:
        for i in range(0, a.numel(), _CHUNK):
            outliers += int(((a[i:i + _CHUNK].double() - s1 / n).abs() > OUTLIER_SIGMAS * sigma).sum())
    if nd == 0:
        cos = 1.0  # identical (also when both are zero)
    elif na == 0 or nb == 0:
        cos = 0.0
    else:
        cos = dot / math.sqrt(na * nb)
    rel = math.sqrt(nd / na) if na > 0 else (0.0 if nd == 0 else math.inf)
    return {"cos": cos, "rel_rms": rel, "max_abs": max_abs, "outliers": outliers}


def decode_pack_quantized(packed: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                          shape: tuple[int, int], bits: int, g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """compressed-tensors pack-quantized -> W_r float32.

    Shapes: packed int32 [out, ceil(in·b/32)]; scale [out, G]; zero_point int32 [ceil(out·b/32), G]
    or None (symmetric); g_idx [in] or None (contiguous groups of in / G) -> W_r [out, in].
    Codes and zeros are stored signed (q − 2^(b−1)), so W_r = (q_s − z_s) · scale.
    """
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    out, inp = shape
    q = unpack_from_int32(packed, bits, torch.Size(shape)).float()  # [out, in], signed
    G = scale.shape[1]
    z = torch.zeros(out, G) if zero_point is None else \
        unpack_from_int32(zero_point, bits, torch.Size((out, G)), packed_dim=0).float()
    g = torch.arange(inp) // (inp // G) if g_idx is None else g_idx.long()
    return (q - z[:, g]) * scale.float()[:, g]


def decode_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                bits: int) -> torch.Tensor:
    """GPTQ v1 -> W_r float32.

    Shapes: qweight int32 [in/k, out]; qzeros int32 [G, out/k]; scales [G, out]; g_idx [in]
    -> W_r [out, in], with k = 32/b codes per int32, lowest bits first, and zero = stored + 1
    (`export.gptq.v1_zeros`).
    """
    from ..export.gptq import unpack_int32, v1_zeros
    codes = unpack_int32(qweight, bits)   # [in, out]
    zeros = v1_zeros(qzeros, bits)        # [G, out]
    g = g_idx.long()
    return ((codes - zeros[g]).double() * scales.double()[g]).float().T.contiguous()


# -- reading checkpoints ------------------------------------------------------------------------
_PACKED_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")
_GPTQ_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


class CheckpointReader:
    """Logical float weights of a checkpoint, decoded one at a time.

    `names()` lists logical tensor names (``<module>.weight`` for a packed linear, the stored name
    for everything else); `get(name)` returns float32; `stored_bytes(name)` counts every on-disk
    tensor the logical one is made of.
    """

    def __init__(self, model_dir: Path):
        self.dir = Path(model_dir)
        self.store = WeightStore(self.dir)
        cfg = json.loads((self.dir / "config.json").read_text())
        self.config = cfg
        self.qcfg = cfg.get("quantization_config") or None
        self.kind = self._kind()
        self._parts: dict[str, dict[str, str]] = {}
        self._order: list[str] = []
        suffixes = {"pack-quantized": _PACKED_SUFFIXES, "gptq": _GPTQ_SUFFIXES}.get(self.kind, ())
        for name in self.store.keys():
            path, _, leaf = name.rpartition(".")
            if leaf in suffixes:
                logical = f"{path}.weight"
                if logical not in self._parts:
                    self._order.append(logical)
                self._parts.setdefault(logical, {})[leaf] = name
            else:
                self._parts[name] = {"": name}
                self._order.append(name)

    def _kind(self) -> str:
        q = self.qcfg
        if q is None:
            return "float"
        method = q.get("quant_method")
        if method == "compressed-tensors":
            fmt = q.get("format")
            if fmt in ("dense", None) and q.get("quantization_status") != "compressed":
                return "float"
            if fmt != "pack-quantized":
                raise LowbitError(f"{self.dir}: compressed-tensors format {fmt!r} is not read by inspect "
                                  "(it reads pack-quantized, GPTQ v1 and float checkpoints)")
            groups = [g["weights"] for g in q.get("config_groups", {}).values() if g.get("weights")]
            if not groups or any(g != groups[0] for g in groups):
                raise LowbitError(f"{self.dir}: config groups with different weight schemes are not read by inspect")
            w = groups[0]
            if w.get("type") != "int" or w.get("strategy") not in ("group", "channel"):
                raise LowbitError(f"{self.dir}: pack-quantized {w.get('type')}/{w.get('strategy')} weights "
                                  "are not read by inspect (int group/channel only)")
            self.bits = int(w["num_bits"])
            return "pack-quantized"
        if method == "gptq":
            if q.get("checkpoint_format", "gptq") != "gptq":
                raise LowbitError(f"{self.dir}: GPTQ checkpoint format {q.get('checkpoint_format')!r} "
                                  "is not read by inspect (v1 'gptq' only)")
            self.bits = int(q["bits"])
            return "gptq"
        raise LowbitError(f"{self.dir}: quantization method {method!r} is not read by inspect")

    def names(self) -> list[str]:
        return list(self._order)

    def is_float(self, name: str) -> bool:
        parts = self._parts[name]
        return "" not in parts or self.store.dtype(parts[""]).is_floating_point

    def stored(self, name: str) -> str:
        parts = self._parts[name]
        return str(self.store.dtype(parts[""])).removeprefix("torch.") if "" in parts else self.kind

    def stored_bytes(self, name: str) -> int:
        total = 0
        for t in self._parts[name].values():
            shape = self.store.shape(t)
            total += math.prod(shape) * torch.empty(0, dtype=self.store.dtype(t)).element_size()
        return total

    def get(self, name: str) -> torch.Tensor:
        parts = self._parts[name]
        if "" in parts:
            return self.store.get(parts[""]).float()
        t = {k: self.store.get(v) for k, v in parts.items()}
        if self.kind == "pack-quantized":
            shape = tuple(int(x) for x in t["weight_shape"].tolist())
            return decode_pack_quantized(t["weight_packed"], t["weight_scale"], t.get("weight_zero_point"),
                                         shape, self.bits, t.get("weight_g_idx"))
        return decode_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], self.bits)

    def codes(self, name: str) -> torch.Tensor | None:
        """Integer codes [out, in] of a pack-quantized linear (signed, as stored), else None."""
        parts = self._parts[name]
        if self.kind != "pack-quantized" or "weight_packed" not in parts:
            return None
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
        shape = torch.Size(int(x) for x in self.store.get(parts["weight_shape"]).tolist())
        return unpack_from_int32(self.store.get(parts["weight_packed"]), self.bits, shape)

    def scale(self, name: str) -> torch.Tensor | None:
        """Group scales [out, G] of a pack-quantized linear, else None."""
        parts = self._parts[name]
        return self.store.get(parts["weight_scale"]) if "weight_scale" in parts else None


def recorded_source(model_dir: Path) -> str:
    """The source checkpoint a lowbit output records in lowbit.json."""
    meta_file = Path(model_dir) / "lowbit.json"
    if not meta_file.is_file():
        raise LowbitError(f"{model_dir} has no lowbit.json naming its source; pass the source checkpoint as B")
    src = json.loads(meta_file.read_text()).get("source", {})
    for key in ("resolved", "path"):
        if src.get(key) and (Path(src[key]).expanduser().exists() or key == "path"):
            return src[key]
    raise LowbitError(f"{model_dir}/lowbit.json records no source path")


def _source_name(name: str, store: WeightStore) -> str | None:
    if name in store:
        return name
    if name == "lm_head.weight":  # quantized lm_head of a model with tied embeddings
        for cand in ("model.embed_tokens.weight", "transformer.wte.weight"):
            if cand in store:
                return cand
    return None


def iter_inspect(a: str, b: str | None = None) -> Iterator[TensorError]:
    """TensorError for every float (or packed) tensor of checkpoint `a` against source `b`."""
    a_dir = resolve_model_dir(a)
    b_dir = resolve_model_dir(b if b is not None else recorded_source(a_dir))
    reader = CheckpointReader(a_dir)
    src = WeightStore(b_dir)
    missing = []
    for name in reader.names():
        if not reader.is_float(name):
            continue
        s_name = _source_name(name, src)
        if s_name is None:
            missing.append(name)
            continue
        W_r = reader.get(name)
        W = src.get(s_name).float()
        if W.shape != W_r.shape:
            raise LowbitError(f"{name}: shape {tuple(W_r.shape)} in {a_dir} but {tuple(W.shape)} in {b_dir}; "
                              "is B the source of A?")
        err = tensor_error(W, W_r)
        bpw = reader.stored_bytes(name) * 8 / max(W_r.numel(), 1)
        yield TensorError(name, tuple(W_r.shape), reader.stored(name), bpw, **err)
    if missing:
        log.warning("%d tensor(s) of %s have no counterpart in %s: %s", len(missing), a_dir, b_dir,
                    ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))


def inspect_checkpoint(a: str, b: str | None = None) -> list[TensorError]:
    return list(iter_inspect(a, b))


# -- presentation -------------------------------------------------------------------------------
SORT_KEYS = {"cos": (lambda e: e.cos, False), "rel_rms": (lambda e: e.rel_rms, True),
             "max_abs": (lambda e: e.max_abs, True), "name": (lambda e: e.name, False)}


def sort_errors(errors: list[TensorError], key: str | None) -> list[TensorError]:
    """Worst first for cos (ascending), rel_rms and max_abs (descending); checkpoint order for None."""
    if key is None:
        return list(errors)
    try:
        fn, reverse = SORT_KEYS[key]
    except KeyError:
        raise LowbitError(f"unknown sort key {key!r}; choose from {', '.join(SORT_KEYS)}") from None
    return sorted(errors, key=fn, reverse=reverse)


def format_errors(errors: list[TensorError]) -> str:
    cols = [("tensor", lambda e: e.name), ("shape", lambda e: "×".join(map(str, e.shape))),
            ("stored", lambda e: e.stored), ("bpw", lambda e: f"{e.bits_per_weight:.3f}"),
            ("cos", lambda e: f"{e.cos:.6f}"), ("rel_rms", lambda e: f"{e.rel_rms:.5f}"),
            ("max_abs", lambda e: f"{e.max_abs:.4g}"), ("outliers", lambda e: str(e.outliers))]
    rows = [[f(e) for _, f in cols] for e in errors]
    widths = [max([len(k)] + [len(r[i]) for r in rows]) for i, (k, _) in enumerate(cols)]

    def line(vals):
        return "  ".join(v.ljust(w) if i < 3 else v.rjust(w) for i, (v, w) in enumerate(zip(vals, widths)))
    head = line([k for k, _ in cols])
    return "\n".join([head, "-" * len(head), *map(line, rows)])


def layer_of(name: str) -> int | None:
    """Decoder layer index in a tensor name (``model.layers.12.mlp...`` -> 12), else None."""
    parts = name.split(".")
    for i, p in enumerate(parts[:-1]):
        if p in ("layers", "h", "blocks") and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None
