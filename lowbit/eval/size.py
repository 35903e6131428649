"""How much memory a model takes in each format lowbit writes, plus its KV cache, against a GPU.

Weights: the tensors lowbit quantizes (every nn.Linear of the decoder layers, lm_head on request)
cost what their on-disk layout declares — for ``int`` the compressed-tensors exporter's own
`layout()` (packed codes, scales in the source dtype, packed zero points, shape), for any other
registered format ``Format.bits_per_weight``. Everything else (embeddings, norms, biases, an
unquantized lm_head) stays in the source dtype, as the exporters write it.

KV cache: 2 (K and V) × layers × kv heads × head dim × context × batch × bytes per element.

Pure functions take a `ModelShape` (tensor names, shapes, dtypes); `model_shape` builds one from
a checkpoint directory (safetensors headers), a config.json, or a hub id (config only).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import LowbitError

_FLOAT_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
                 "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
KV_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1, "int8": 1}
_ST_DTYPE = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int32: "I32",
             torch.int64: "I64", torch.int8: "I8", torch.uint8: "U8", torch.float64: "F64", torch.bool: "BOOL"}


# -- units --------------------------------------------------------------------------------------
_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}


def parse_bytes(s: str | int | float) -> int:
    """'24GiB' -> 25769803776; '8GB' -> 8e9; bare 'G' means GiB; plain numbers are bytes."""
    if isinstance(s, (int, float)):
        return int(s)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", s)
    if not m or m.group(2).lower() not in _UNITS:
        raise LowbitError(f"cannot read {s!r} as a memory size; write e.g. 24GiB, 80GB or 512MiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_fraction(s: str | float) -> float:
    """'20%' -> 0.2; '0.2' -> 0.2."""
    if isinstance(s, (int, float)):
        return float(s)
    s = s.strip()
    try:
        return float(s[:-1]) / 100 if s.endswith("%") else float(s)
    except ValueError:
        raise LowbitError(f"cannot read {s!r} as a fraction; write e.g. 20% or 0.2") from None


def format_bytes(n: int | float | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


# -- model shape --------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    role: str = "other"  # "linear" (quantized by lowbit), "lm_head", or "other"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * _element_size(self.dtype)


@dataclass(frozen=True)
class ModelShape:
    name: str
    model_type: str
    tensors: tuple[TensorSpec, ...]
    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype                      # the source float dtype (lowbit stores scales in it)
    tied_lm_head: tuple[int, int] | None = None  # (vocab, hidden) when lm_head shares the embeddings

    @property
    def params(self) -> int:
        return sum(t.numel for t in self.tensors)

    def kv_bytes_per_token(self, bytes_per_elem: float) -> float:
        return 2 * self.layers * self.kv_heads * self.head_dim * bytes_per_elem


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


# -- schemes ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WeightScheme:
    """A storage choice: a plain float dtype, or a registered format with bits / group / symmetry."""

    label: str
    format: str | None = None           # None: every float tensor in `float_dtype`
    bits: int | None = None
    group_size: int = 128
    sym: bool = False
    float_dtype: torch.dtype | None = None


def parse_scheme(s: str, group_size: int = 128, sym: bool = False) -> WeightScheme:
    """'bf16', 'fp16', 'int4', 'int4-g64', 'int3-g0-sym', '<format><bits>' or a registered format name."""
    from ..formats import FORMATS
    base, *mods = s.lower().split("-")
    for m in mods:
        if re.fullmatch(r"g\d+", m):
            group_size = int(m[1:])
        elif m in ("sym", "asym"):
            sym = m == "sym"
        else:
            raise LowbitError(f"scheme {s!r}: unknown part {m!r} (use -g<N> for the group size, -sym or -asym)")
    if base in _FLOAT_DTYPES:
        return WeightScheme(s, float_dtype=_FLOAT_DTYPES[base])
    if base in FORMATS:
        return WeightScheme(s, format=base, bits=None, group_size=group_size, sym=sym)
    m = re.fullmatch(r"([a-z_]+?)(\d+)", base)
    if m and m.group(1) in FORMATS:
        return WeightScheme(_label(m.group(1), int(m.group(2)), group_size, sym), m.group(1), int(m.group(2)),
                            group_size, sym)
    raise LowbitError(f"unknown scheme {s!r}; use fp16, bf16, fp32, int2..int8[-g<N>][-sym] or one of the "
                      f"registered formats: {', '.join(sorted(FORMATS))}")


def _label(fmt: str, bits: int | None, group_size: int, sym: bool) -> str:
    return f"{fmt}{bits or ''}-g{group_size}{'-sym' if sym else ''}"


def default_schemes(group_size: int = 128, sym: bool = False) -> list[WeightScheme]:
    """16-bit, int8/4/3/2 at `group_size`, and every other registered format as it builds itself
    from that scheme (formats with fixed blocks, e.g. MXFP4 or GGUF, keep their own)."""
    from ..formats import FORMATS
    out = [WeightScheme("fp16/bf16", float_dtype=torch.float16)]
    out += [WeightScheme(_label("int", b, group_size, sym), "int", b, group_size, sym) for b in (8, 4, 3, 2)]
    for name in sorted(FORMATS):
        if name == "int":
            continue
        s = WeightScheme(name, name, None, group_size, sym)
        try:
            gs = getattr(_make_format(s), "group_size", group_size)
            label = name if name.startswith("gguf:") or not gs else f"{name}-g{gs}"
        except LowbitError:
            label = name
        out.append(WeightScheme(label, name, None, group_size, sym))
    return out


def _make_format(scheme: WeightScheme):
    """The registered format for `scheme`, built the way the pipeline builds it (``from_scheme``)."""
    import inspect as _inspect
    from ..formats import FORMATS
    from ..spec import QuantScheme
    cls = FORMATS[scheme.format]
    try:
        bits = scheme.bits
        if bits is None:  # the format's own default width
            bits = _inspect.signature(cls.__init__).parameters["bits"].default
        qs = QuantScheme(format=scheme.format, bits=bits, group_size=scheme.group_size, sym=scheme.sym)
        if hasattr(cls, "from_scheme"):
            return cls.from_scheme(qs)
        return cls(bits=bits, group_size=scheme.group_size, sym=scheme.sym)
    except (TypeError, ValueError, KeyError) as e:
        raise LowbitError(f"{scheme.label}: {e}") from None


def quantized_tensors(name: str, out_features: int, in_features: int, scheme: WeightScheme,
                      scale_dtype: torch.dtype) -> list[TensorSpec] | None:
    """The on-disk tensors one quantized linear becomes, when the format declares a layout (int).

    Returns None for formats sized by bits per weight only. Raises LowbitError when the group
    size does not divide `in_features` (lowbit refuses to quantize such a tensor).
    """
    fmt = _make_format(scheme)
    groups = fmt.groups(in_features)
    if scheme.format != "int":
        return None
    from ..export.compressed_tensors import layout
    path = name.removesuffix(".weight")
    return [TensorSpec(f"{path}.{k}", tuple(shape), dtype or scale_dtype)
            for k, (shape, dtype) in layout(out_features, in_features, fmt.bits, groups, fmt.sym).items()]


def linear_bytes(out_features: int, in_features: int, scheme: WeightScheme, scale_dtype: torch.dtype) -> int:
    """Bytes of one quantized linear's weight in `scheme`, metadata included."""
    specs = quantized_tensors("w.weight", out_features, in_features, scheme, scale_dtype)
    if specs is not None:
        return sum(t.nbytes for t in specs)
    fmt = _make_format(scheme)
    return math.ceil(fmt.bits_per_weight(in_features) * out_features * in_features / 8)


@dataclass
class WeightSize:
    scheme: str
    quantized_bytes: int = 0      # linears in the quantized format
    kept_bytes: int = 0           # everything stored as before
    quantized_params: int = 0
    kept_params: int = 0
    tensors: list[TensorSpec] = field(default_factory=list)  # the file's tensors, when a layout is declared
    exact_layout: bool = True

    @property
    def total_bytes(self) -> int:
        return self.quantized_bytes + self.kept_bytes

    @property
    def linear_bpw(self) -> float | None:
        return 8 * self.quantized_bytes / self.quantized_params if self.quantized_params else None


def weight_size(shape: ModelShape, scheme: WeightScheme, keep_dtype: torch.dtype | None = None,
                quantize_lm_head: bool = False) -> WeightSize:
    """Weight bytes of `shape` stored in `scheme` (see the module docstring for what is quantized)."""
    ws = WeightSize(scheme.label)
    if scheme.format is None:
        for t in shape.tensors:
            dt = scheme.float_dtype if t.dtype.is_floating_point else t.dtype
            _keep(ws, TensorSpec(t.name, t.shape, dt, t.role))
        return ws
    targets = [t for t in shape.tensors if t.role == "linear" or (quantize_lm_head and t.role == "lm_head")]
    extra = []
    if quantize_lm_head and shape.tied_lm_head is not None:  # the exporter writes a separate lm_head
        extra = [TensorSpec("lm_head.weight", shape.tied_lm_head, shape.dtype, "lm_head")]
    target_names = {t.name for t in targets}
    for t in shape.tensors:
        if t.name not in target_names:
            dt = keep_dtype if (keep_dtype is not None and t.dtype.is_floating_point) else t.dtype
            _keep(ws, TensorSpec(t.name, t.shape, dt, t.role))
    for t in targets + extra:
        out_f, in_f = t.shape
        try:
            specs = quantized_tensors(t.name, out_f, in_f, scheme, shape.dtype)
        except LowbitError as e:
            raise LowbitError(f"{scheme.label}: {t.name}: {e}") from None
        ws.quantized_params += t.numel
        if specs is None:
            ws.exact_layout = False
            ws.quantized_bytes += linear_bytes(out_f, in_f, scheme, shape.dtype)
        else:
            ws.quantized_bytes += sum(s.nbytes for s in specs)
            ws.tensors.extend(specs)
    return ws


def _keep(ws: WeightSize, t: TensorSpec) -> None:
    ws.kept_bytes += t.nbytes
    ws.kept_params += t.numel
    ws.tensors.append(t)


def kv_cache_bytes(layers: int, kv_heads: int, head_dim: int, ctx: int, batch: int, bytes_per_elem: float) -> int:
    """K and V for every layer, kv head, position and sequence."""
    return int(2 * layers * kv_heads * head_dim * ctx * batch * bytes_per_elem)


def safetensors_file_bytes(tensors: list[TensorSpec], metadata: dict | None = None) -> int:
    """Size of a safetensors file holding `tensors`: 8-byte length, JSON header (8-aligned), data."""
    meta = {"format": "pt"} if metadata is None else metadata
    header: dict = {"__metadata__": meta} if meta else {}
    offset = 0
    for t in sorted(tensors, key=lambda t: t.name):
        header[t.name] = {"dtype": _ST_DTYPE[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    n = len(json.dumps(header, separators=(",", ":")).encode())
    return 8 + n + (-n % 8) + offset


# -- the table ----------------------------------------------------------------------------------
@dataclass
class SizeRow:
    scheme: str
    weights_bytes: int | None
    linear_bpw: float | None
    kv_bytes: int
    total_bytes: int | None
    fits: bool | None
    max_ctx: int | None
    note: str = ""

    def to_json(self) -> dict:
        return dict(self.__dict__)


def size_table(shape: ModelShape, schemes: list[WeightScheme], ctx: int, batch: int, kv_bytes_per_elem: float,
               gpu_mem: int | None = None, reserve: float = 0.0, keep_dtype: torch.dtype | None = None,
               quantize_lm_head: bool = False) -> list[SizeRow]:
    kv = kv_cache_bytes(shape.layers, shape.kv_heads, shape.head_dim, ctx, batch, kv_bytes_per_elem)
    usable = None if gpu_mem is None else gpu_mem * (1 - reserve)
    rows = []
    for s in schemes:
        try:
            ws = weight_size(shape, s, keep_dtype, quantize_lm_head)
        except LowbitError as e:
            rows.append(SizeRow(s.label, None, None, kv, None, None, None, str(e)))
            continue
        total = ws.total_bytes + kv
        fits = max_ctx = None
        if usable is not None:
            fits = total <= usable
            per_tok = shape.kv_bytes_per_token(kv_bytes_per_elem) * batch
            max_ctx = max(int((usable - ws.total_bytes) // per_tok), 0) if per_tok else None
        note = "" if ws.exact_layout else "from bits_per_weight"
        rows.append(SizeRow(s.label, ws.total_bytes, ws.linear_bpw, kv, total, fits, max_ctx, note))
    return rows


def format_size_table(shape: ModelShape, rows: list[SizeRow], ctx: int, batch: int, kv_dtype: str,
                      gpu_mem: int | None, reserve: float) -> str:
    n_lin = sum(t.numel for t in shape.tensors if t.role == "linear")
    lines = [f"model: {shape.name} ({shape.model_type}, {shape.layers} layers, {shape.params:,} params, "
             f"{n_lin:,} in quantizable linears, source {str(shape.dtype).removeprefix('torch.')})",
             f"KV cache: {kv_dtype}, ctx {ctx} × batch {batch} = "
             f"{format_bytes(shape.kv_bytes_per_token(KV_BYTES[kv_dtype]))}/token → {format_bytes(rows[0].kv_bytes)}"]
    if gpu_mem is not None:
        lines.append(f"GPU memory {format_bytes(gpu_mem)}, {reserve:.0%} reserved for activations and runtime "
                     f"→ {format_bytes(gpu_mem * (1 - reserve))} usable")
    cols = ["scheme", "bpw(linears)", "weights", "KV cache", "total"]
    cols += (["fits", "max ctx"] if gpu_mem else []) + ["note"]
    table = []
    for r in rows:
        row = [r.scheme, "-" if r.linear_bpw is None else f"{r.linear_bpw:.3f}", format_bytes(r.weights_bytes),
               format_bytes(r.kv_bytes), format_bytes(r.total_bytes)]
        if gpu_mem:
            row += ["-" if r.fits is None else ("yes" if r.fits else "NO"),
                    "-" if r.max_ctx is None else str(r.max_ctx)]
        table.append(row + [r.note])
    widths = [max([len(c)] + [len(t[i]) for t in table]) for i, c in enumerate(cols)]
    fmt = lambda vals: "  ".join(v.ljust(w) if i in (0, len(cols) - 1) else v.rjust(w)  # noqa: E731
                                 for i, (v, w) in enumerate(zip(vals, widths))).rstrip()
    return "\n".join(lines + ["", fmt(cols), "-" * sum(widths + [2 * (len(cols) - 1)])] + [fmt(t) for t in table])


# -- reading a model's shape (I/O) --------------------------------------------------------------
def _config_dir(source: str) -> Path:
    """A directory holding config.json for a config file, a model dir or a hub id (config only)."""
    p = Path(source).expanduser()
    if p.is_file() and p.name.endswith(".json"):
        return p.parent if p.name == "config.json" else _copy_config(p)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise LowbitError(f"{p} has no config.json")
        return p
    if p.exists():
        raise LowbitError(f"{p} is neither a config.json nor a model directory")
    parts = source.split("/")
    if len(parts) == 2 and all(parts):
        from huggingface_hub import hf_hub_download
        try:
            return Path(hf_hub_download(source, "config.json")).parent
        except Exception as e:  # the hub client raises many types; all mean "could not fetch"
            raise LowbitError(f"could not fetch config.json of {source} ({type(e).__name__}: {e})") from e
    raise LowbitError(f"{source} is not a config.json, a model directory or a hub id")


def _copy_config(p: Path) -> Path:
    import tempfile
    d = Path(tempfile.mkdtemp(prefix="lowbit-size-"))
    (d / "config.json").write_text(p.read_text())
    return d


def model_shape(source: str) -> ModelShape:
    """The tensors of `source`: exact from safetensors headers when the weights are local and not
    already quantized, else from the architecture built on the meta device from config.json."""
    from accelerate import init_empty_weights
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    cdir = _config_dir(source)
    config = AutoConfig.from_pretrained(cdir)
    if getattr(config, "quantization_config", None) is not None:
        raise LowbitError(f"{source} is already quantized; size its source model instead")
    try:
        with init_empty_weights(include_buffers=False):
            skeleton = AutoModelForCausalLM.from_config(config)
    except Exception as e:
        raise LowbitError(f"transformers cannot build {getattr(config, 'model_type', '?')} from "
                          f"{cdir / 'config.json'} ({type(e).__name__}: {e})") from e
    out_emb = skeleton.get_output_embeddings()
    lm_head = next((n for n, m in skeleton.named_modules() if m is out_emb), "lm_head")
    linears = {n for n, m in skeleton.named_modules() if isinstance(m, nn.Linear) and n != lm_head}

    def role(name: str) -> str:
        path, _, leaf = name.rpartition(".")
        if leaf != "weight":
            return "other"
        return "linear" if path in linears else "lm_head" if path == lm_head else "other"

    cfg_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    dtype = getattr(torch, cfg_dtype) if isinstance(cfg_dtype, str) else cfg_dtype
    if list(cdir.glob("*.safetensors")):
        from ..model.source import WeightStore
        store = WeightStore(cdir)
        tensors = tuple(TensorSpec(n, store.shape(n), store.dtype(n), role(n)) for n in store.keys())
        lin = [t for t in tensors if t.role == "linear"]
        dtype = lin[0].dtype if lin else dtype
    else:
        tensors = tuple(TensorSpec(n, tuple(p.shape), dtype, role(n)) for n, p in skeleton.named_parameters())
    names = {t.name for t in tensors}
    tied = None
    if f"{lm_head}.weight" not in names and out_emb is not None:
        tied = tuple(out_emb.weight.shape)
    text = config.get_text_config()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return ModelShape(name=str(source), model_type=config.model_type, tensors=tensors,
                      layers=text.num_hidden_layers, kv_heads=getattr(text, "num_key_value_heads", None) or heads,
                      head_dim=head_dim, dtype=dtype, tied_lm_head=tied)
