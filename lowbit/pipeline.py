"""quantize: stream a model layer by layer through a method, then export atomically.

Layer i sees the calibration activations produced by the already-quantized layers before it.
Every finished layer is saved to ``<output>.partial/layers`` so a killed run resumes; the
output directory appears only when everything is written.

Under torchrun (`dist` given) every process streams the same layers and holds calibration batch j
when j mod N is its rank (model/layer.py sums statistics and shares out per-linear work); rank 0
alone reads and writes the output, plan and partial directories.
"""
from __future__ import annotations

import copy
import ctypes
import json
import logging
import shutil
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import __version__
from .algorithms import Method, make_method
from .data import calibration_ids, load_text
from .distributed import Dist, all_gather, broadcast
from .errors import LowbitError
from .export import ExportContext, check_exportable, get_exporter
from .formats import QParams, QuantizedTensor, make_format
from .formats.map import FormatMap
from .model.layer import BatchSplit, LayerData
from .model.source import copy_aux_files, model_size_bytes, resolve_model_dir
from .model.stream import Batch, StreamedModel
from .paths import disk_full_as_error, publish_dir
from .plan import Plan, load_layer, save_layer
from .provenance import checksums, peak_memory, versions
from .spec import QuantizeConfig

log = logging.getLogger(__name__)


def quantize(cfg: QuantizeConfig, overwrite: bool = False, resume: bool = False, progress: bool = True,
             dist: Dist | None = None) -> Path:
    """Quantize `cfg.model_path` into `cfg.output_dir`; returns the output directory.

    `dist`: this process's place among torchrun's processes (None: the only one).
    """
    t0 = time.perf_counter()
    _free_large_blocks_at_once()
    main = dist is None or dist.is_main
    out = Path(cfg.output_dir).expanduser()
    partial = out.with_name(out.name + ".partial")
    model_dir = _main_first(dist, lambda: resolve_model_dir(cfg.model_path), everyone=True)

    def checks() -> None:
        _check_output(out, partial, cfg, overwrite, resume)
        get_exporter(cfg.export_format)  # fail on a bad name before any work

    _main_first(dist, checks)
    device = _device(cfg.device)
    if dist is not None and device.type == "cuda":
        device = dist.device  # this rank's GPU
    model = StreamedModel(model_dir, device=device, dtype=_compute_dtype(cfg.dtype, device, model_dir))
    source_dtype = _source_dtype(model)
    method = make_method(cfg.method, cfg.options())
    fmt = _formats(cfg, model, method, source_dtype)
    layer_ids = _layer_selection(cfg.layers, model.num_layers)
    _check_shapes(model, fmt, layer_ids, cfg.quantize_lm_head)
    check_exportable(cfg.export_format, fmt.default)  # before hours of work, not after

    layers_dir = partial / "layers"

    def prepare() -> None:
        _check_disk(model_dir, out)
        layers_dir.mkdir(parents=True, exist_ok=True)
        (partial / "recipe.json").write_text(json.dumps(cfg.recipe(), indent=2, default=str))

    _main_first(dist, prepare)

    timings: dict[str, float] = {}
    # no_grad, not inference_mode: a method may tune parameters by gradient (awq-joint's refine)
    with disk_full_as_error(partial), torch.no_grad():
        t = time.perf_counter()
        batches, split, calib_info = _calibration_batches(model, method, cfg, dist)
        timings["calibration_s"] = time.perf_counter() - t

        t = time.perf_counter()
        _quantize_layers(model, method, fmt, batches, split, layer_ids, layers_dir, cfg, progress and main)
        if cfg.quantize_lm_head:
            _quantize_lm_head(model, method, fmt, batches, split, layers_dir, cfg)
        timings["quantize_s"] = time.perf_counter() - t
        per_rank = all_gather(dist, peak_memory(device))  # the last collective: rank 0 exports alone
        if not main:
            return out

        t = time.perf_counter()
        export_dir = partial / "export"
        shutil.rmtree(export_dir, ignore_errors=True)
        export_dir.mkdir()
        ctx = ExportContext(store=model.store, config=copy.deepcopy(model.config), family=model.family,
                            plan=Plan(layers_dir, fmt), fmt=fmt.default, dtype=source_dtype)
        get_exporter(cfg.export_format)(ctx, export_dir)
        copy_aux_files(model_dir, export_dir)
        timings["export_s"] = time.perf_counter() - t
        timings["total_s"] = time.perf_counter() - t0

        meta = {
            "lowbit_version": __version__,
            "recipe": cfg.recipe(),
            "source": {"path": str(cfg.model_path), "resolved": str(model_dir),
                       "bytes": model_size_bytes(model_dir)},
            "calibration": calib_info,
            "device": str(device),
            "versions": versions(),
            "seed": cfg.calib.seed,
            "timings": timings,
            "peak_memory": peak_memory(device),
            **({"processes": dist.world, "peak_memory_per_rank": per_rank} if dist is not None else {}),
            "layer_stats": ctx.plan.stats,
            "checksums": checksums(export_dir),
        }
        (export_dir / "lowbit.json").write_text(json.dumps(meta, indent=2, default=str))
    publish_dir(export_dir, out)
    shutil.rmtree(partial, ignore_errors=True)
    log.info("wrote %s in %.1fs", out, timings["total_s"])
    return out


# -- checks ------------------------------------------------------------------------------------
def _main_first(dist: Dist | None, fn, everyone: bool = False):
    """fn() on rank 0 (then on the others too if `everyone`); an error there stops every rank."""
    if dist is None:
        return fn()
    result, error = None, None
    if dist.is_main:
        try:
            result = fn()
        except Exception as e:
            error = e
    message = broadcast(dist, None if error is None else str(error), 0)
    if error is not None:
        raise error
    if message is not None:
        raise LowbitError(f"rank 0 stopped: {message}")
    return fn() if everyone and not dist.is_main else result


def _check_output(out: Path, partial: Path, cfg: QuantizeConfig, overwrite: bool, resume: bool) -> None:
    if out.exists() and not overwrite:
        raise LowbitError(f"output dir {out} already exists; pass --overwrite to replace it")
    if resume:
        recipe = partial / "recipe.json"
        if not recipe.is_file():
            raise LowbitError(f"nothing to resume: {partial} does not exist; run without --resume")
        saved = json.loads(recipe.read_text())
        now = json.loads(json.dumps(cfg.recipe(), default=str))
        if saved != now:
            diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
            raise LowbitError(f"cannot resume {partial}: the recipe differs in {', '.join(diff)}; "
                              "rerun with the same options or without --resume")
    elif partial.exists():
        log.warning("removing an unfinished earlier run in %s (use --resume to continue it)", partial)
        shutil.rmtree(partial)


def _device(name: str) -> torch.device:
    d = torch.device(name)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise LowbitError("--device cuda requested but no CUDA GPU is visible; use --device cpu")
    return d


def _source_dtype(model: StreamedModel) -> torch.dtype:
    first_linear = f"{model.layer_path(0)}.{model.linear_names(0)[0]}.weight"
    return model.store.dtype(model.source_name(*first_linear.rsplit(".", 1)))


def _compute_dtype(name: str, device: torch.device, model_dir: Path) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cpu":
        return torch.float32
    from transformers import AutoConfig
    return getattr(AutoConfig.from_pretrained(model_dir), "dtype", None) or torch.float16


def _layer_selection(spec: str | None, n: int) -> list[int]:
    """'0-3,7' -> [0, 1, 2, 3, 7]; None -> all layers."""
    if not spec:
        return list(range(n))
    ids: set[int] = set()
    try:
        for part in spec.split(","):
            a, _, b = part.partition("-")
            ids.update(range(int(a), int(b or a) + 1))
    except ValueError:
        raise LowbitError(f"--layers {spec!r} is not a list of ranges like '0-1,5'") from None
    if not ids or max(ids) >= n or min(ids) < 0:
        raise LowbitError(f"--layers {spec!r} is out of range; the model has layers 0-{n - 1}")
    return sorted(ids)


def _formats(cfg: QuantizeConfig, model: StreamedModel, method: Method, source_dtype: torch.dtype) -> FormatMap:
    """The format of every linear: one for all, or per tensor for GGUF types (--weight-format
    gguf:Q4_K_M, or gguf:q4_k where rows fall back), with the imatrix rules when the method has
    calibration activations to weigh the encoders by."""
    from .export.gguf import is_gguf_spec, linear_formats
    if is_gguf_spec(cfg.scheme.format):
        return linear_formats(model.config, cfg.scheme.format, has_imatrix=method.needs_calibration)
    return FormatMap(make_format(cfg.scheme, scale_dtype=source_dtype))


def _check_shapes(model: StreamedModel, formats: FormatMap, layer_ids: list[int], lm_head: bool) -> None:
    paths = [f"{model.layer_path(i)}.{n}" for i in layer_ids for n in model.linear_names(i)]
    if lm_head:
        paths.append(model.family.lm_head)
    for path in paths:
        shape = model.weight_shape(path)
        try:
            formats(path, shape).groups(shape[1])
        except LowbitError as e:
            raise LowbitError(f"{path}: {e}") from None


def _check_disk(model_dir: Path, out: Path) -> None:
    parent = out.parent if out.parent.exists() else Path.cwd()
    need = model_size_bytes(model_dir) // 2  # generous bound for a ≥4x smaller output plus the plan
    free = shutil.disk_usage(parent).free
    if free < need:
        raise LowbitError(f"not enough disk space in {parent}: {free / 2**30:.1f} GiB free, about "
                          f"{need / 2**30:.1f} GiB needed; free space or choose another --output-dir")


# -- stages ------------------------------------------------------------------------------------
def _calibration_batches(model: StreamedModel, method: Method, cfg: QuantizeConfig,
                         dist: Dist | None) -> tuple[list[Batch], BatchSplit, dict]:
    """This process's calibration batches (batch j on rank j mod N), which ones they are, and their source."""
    if not method.needs_calibration:
        return [], BatchSplit((), (), dist), {"used": False}
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model.dir)
    src = load_text(cfg.calib.dataset, split="calibration")
    ids = calibration_ids(tok, src, cfg.calib.n_samples, cfg.calib.seq_len, cfg.calib.seed)
    chunks = ids.split(cfg.calib.batch_size)
    world, rank = (1, 0) if dist is None else (dist.world, dist.rank)
    if len(chunks) < world:
        raise LowbitError(f"{len(chunks)} calibration batch(es) cannot be shared by {world} processes; "
                          f"raise --n-calib to at least {world * cfg.calib.batch_size} or lower --calib-batch-size")
    mine = [j for j in range(len(chunks)) if j % world == rank]
    batches = [model.embed(chunks[j]) for j in mine]
    model.release(model.family.embed)
    split = BatchSplit(tuple(mine), tuple(c.numel() for c in chunks), dist)
    info = {"used": True, "source": src.name, "sha256": src.sha256, "n_samples": int(ids.shape[0]),
            "seq_len": int(ids.shape[1]), "seed": cfg.calib.seed}
    return batches, split, info


def _free_large_blocks_at_once() -> None:
    """Have glibc map every allocation over 32 MiB on its own and unmap it when freed, and keep the
    smaller ones' heap between layers (`_return_free_heap` gives it back after each layer). By default
    the map threshold climbs with the sizes freed, after which freed weight-sized temporaries stay in
    the heap and the resident size of a layer-by-layer run creeps up by gigabytes. A lower threshold
    (1 MiB before 2026-12-07) pays a page fault per fresh page of every activation-sized temporary:
    GPTQ on SmolLM2 spent 55 of its 85 s in the kernel (now 8 of 54 s, peak RSS 0.71 -> 1.0 GB)."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD (the largest glibc takes; fixes it: no more climbing)
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: no trimming of the heap top between allocations


def _return_free_heap() -> None:
    """Give the heap's free pages back to the system (between layers: see `_free_large_blocks_at_once`)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # another C library (musl) may lack them: nothing to tune
        return libc
    except (OSError, AttributeError):
        return None


def _quantize_layers(model: StreamedModel, method: Method, fmt: FormatMap, batches: list[Batch], split: BatchSplit,
                     layer_ids: list[int], layers_dir: Path, cfg: QuantizeConfig, progress: bool) -> None:
    """Quantize the selected layers in order, `layer_batch_size` layers resident at a time.

    Calibration activations are pushed through every layer up to the last one that needs them
    (through all layers when lm_head is quantized with activations); beside them the float model's
    own, where the method asks for them (`Method.wants_float_stream`).
    """
    selected = set(layer_ids)
    stop = model.num_layers if (cfg.quantize_lm_head and batches) else max(layer_ids) + 1
    float_stream = bool(batches) and method.wants_float_stream()
    for b in batches if float_stream else ():
        b.reference = b.hidden
    bar = tqdm(total=len(layer_ids), desc=f"{cfg.method} layers", unit="layer", disable=not progress)
    writer = _PlanWriter(background=model.device.type == "cuda")
    try:
        for chunk_start in range(0, stop, cfg.layer_batch_size):
            chunk = range(chunk_start, min(chunk_start + cfg.layer_batch_size, stop))
            for i in chunk:
                model.materialize(model.layer_path(i))
            for i in chunk:
                narrow = None
                for b in batches if float_stream else ():  # before the layer's weights are replaced
                    b.target = _checked(model.run_layer(i, Batch(b.reference, b.layer_kwargs)), f"layer {i} float output")
                if i in selected:
                    narrow = _quantize_one_layer(model, method, fmt, batches, split, i, layers_dir, writer)
                    bar.update(1)
                if batches and (i + 1 < stop or cfg.quantize_lm_head):
                    run = _layer_forward(model, i, batches, split, narrow)
                    for b in batches:
                        b.hidden = _checked(run(b), f"layer {i} output")
                for b in batches if float_stream else ():
                    b.reference, b.target = b.target, None
                model.release(model.layer_path(i))
                _return_free_heap()
    finally:
        writer.close()
    bar.close()


class _PlanWriter:
    """Writes layer plans, on a GPU run in a background thread: the next layer's GPU work then overlaps
    the disk write (an 8B layer's plan is ~230 MB), which would otherwise hold up every other process
    under torchrun. A CPU run writes in line, as its memory, not its disk, is what is short.
    A failed write (a full disk) is raised at the next write or at `close`."""

    def __init__(self, background: bool):
        self.pool = ThreadPoolExecutor(1) if background else None
        self.pending: Future | None = None

    def save(self, path: Path, quantized: dict[str, QuantizedTensor], updates: dict[str, torch.Tensor],
             stats: dict) -> None:
        if self.pool is None:
            return save_layer(path, quantized, updates, stats)
        on_host = {n: QuantizedTensor(qt.W_q.cpu(), QParams(qt.qparams.scale.cpu(), qt.qparams.zero.cpu()),
                                      qt.format, None if qt.g_idx is None else qt.g_idx.cpu())
                   for n, qt in quantized.items()}
        self.wait()
        self.pending = self.pool.submit(save_layer, path, on_host, {n: t.cpu() for n, t in updates.items()}, stats)

    def wait(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()

    def close(self) -> None:
        if self.pool is not None:
            try:
                self.wait()
            finally:
                self.pool.shutdown()


def _quantize_one_layer(model: StreamedModel, method: Method, fmt: FormatMap, batches: list[Batch], split: BatchSplit,
                        i: int, layers_dir: Path, writer: "_PlanWriter") -> torch.dtype | None:
    """Quantize (or resume) layer i and put its reconstructed weights in; returns the dtype its outputs
    are to be computed in for the next layer (`Method.propagation_dtype`; None: the layer's own)."""
    path = model.layer_path(i)
    module = model.layers[i]
    plan_file = layers_dir / f"{i:05d}.safetensors"
    main = split.dist is None or split.dist.is_main
    names = model.linear_names(i)
    data = LayerData(i, module, model.family, batches, names, run=lambda b, i=i: model.run_layer(i, b),
                     split=split, disposable=True)  # `_apply` below puts its weights back
    layer_fmt = fmt.for_layer(path, {n: tuple(W.shape) for n, W in data.weights.items()})
    narrow = method.propagation_dtype(data, layer_fmt) if batches else None
    if broadcast(split.dist, main and plan_file.is_file(), 0):  # rank 0 owns the plan files
        quantized, updates = broadcast(split.dist, load_layer(plan_file, fmt) if main else None, 0)
        log.info("layer %d: resumed from %s", i, plan_file.name)
    else:
        for n, W in data.weights.items():
            _checked(W, f"{path}.{n}.weight")
        result = method.quantize_layer(data, layer_fmt)
        quantized = {f"{path}.{n}": qt for n, qt in result.quantized.items()}
        updates = {f"{path}.{n}": t for n, t in result.updates.items()}
        if main:
            writer.save(plan_file, quantized, updates, result.stats)
        if result.stats:
            log.info("layer %d: %s", i, result.stats)
    _apply(model, quantized, updates)
    return narrow


def _layer_forward(model: StreamedModel, i: int, batches: list[Batch], split: BatchSplit,
                   dtype: torch.dtype | None) -> Callable[[Batch], torch.Tensor]:
    """Layer i's output for a batch, in the batch's dtype: computed by the layer itself, or by a copy of
    it in `dtype` (see LayerData.narrowed)."""
    run = lambda b: model.run_layer(i, b)  # noqa: E731
    if dtype is None:
        return run
    view = LayerData(i, model.layers[i], model.family, batches, (), run=run, split=split).narrowed(dtype)

    def narrowed_run(b: Batch) -> torch.Tensor:
        out = view.run(b)
        return (out[0] if isinstance(out, tuple) else out).to(b.hidden.dtype)
    return narrowed_run


def _quantize_lm_head(model: StreamedModel, method: Method, fmt: FormatMap, batches: list[Batch], split: BatchSplit,
                      layers_dir: Path, cfg: QuantizeConfig) -> None:
    """lm_head in `lmhead_chunks` row chunks, so only one chunk's work is in memory at once.

    `batches` hold the last decoder layer's outputs; the final norm turns them into lm_head inputs.
    """
    plan_file = layers_dir / "lm_head.safetensors"
    main = split.dist is None or split.dist.is_main
    if broadcast(split.dist, main and plan_file.is_file(), 0):
        return
    name = model.family.lm_head
    W = _checked(model.materialize(name).weight.detach(), f"{name}.weight")
    head_fmt = fmt(name, tuple(W.shape))
    norm = model.materialize(model.family.final_norm)
    pieces = []
    for rows in torch.arange(W.shape[0]).chunk(max(1, cfg.lmhead_chunks)):
        chunk = torch.nn.Linear(W.shape[1], len(rows), bias=False, device=W.device, dtype=W.dtype)
        chunk.weight.data = W[rows]
        data = LayerData("lm_head", chunk, model.family, batches, [""],
                         run=lambda b, m=chunk: m(norm(b.hidden)), split=split)
        pieces.append(method.quantize_layer(data, head_fmt).quantized[""])
    g_idx = pieces[0].g_idx  # chunks share their input, hence any act-order permutation
    if any((p.g_idx is None) != (g_idx is None) or (g_idx is not None and not torch.equal(p.g_idx, g_idx))
           for p in pieces):
        raise LowbitError("lm_head chunks were quantized with different group orders; use --lmhead-chunks 1")
    qt = QuantizedTensor(torch.cat([p.W_q for p in pieces]),
                         QParams(torch.cat([p.qparams.scale for p in pieces]),
                                 torch.cat([p.qparams.zero for p in pieces])), head_fmt, g_idx)
    if main:
        save_layer(plan_file, {name: qt}, {}, {"chunks": len(pieces)})
    model.release(name)
    model.release(model.family.final_norm)


def _apply(model: StreamedModel, quantized: dict, updates: dict) -> None:
    """Put the reconstructed weights (and updated params) into the live layer."""
    for path, qt in quantized.items():
        lin = model.skeleton.get_submodule(path)
        lin.weight.data = qt.dequantize().to(device=lin.weight.device, dtype=lin.weight.dtype)
    for name, t in updates.items():
        p = model.skeleton.get_parameter(name)
        p.data = t.to(device=p.device, dtype=p.dtype)


def _checked(t: torch.Tensor, what: str) -> torch.Tensor:
    if not torch.isfinite(t).all():
        raise LowbitError(f"{what} contains NaN or Inf; the input model is corrupt or overflows in this dtype "
                          "(try --dtype float32)")
    return t
