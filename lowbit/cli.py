"""The command line: the only place that reads argv and the environment."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from .errors import LowbitError
from .eval.commands import COMMANDS as EVAL_TOOLS  # eval, compare, inspect, size, gate, recommend, report
from .export.commands import add_export


def _method_flags(p: argparse.ArgumentParser) -> None:
    """Every option of every registered method becomes a flag; unset flags keep each method's default."""
    from .algorithms import METHODS
    defaults: dict[str, dict[str, object]] = {}
    for cls in METHODS.values():
        for key, default in cls.defaults.items():
            defaults.setdefault(key, {})[cls.name] = default
    for key, per_method in defaults.items():
        flag = "--" + key.replace("_", "-")
        sample = next(iter(per_method.values()))
        help_ = "default: " + ", ".join(f"{v} ({m})" for m, v in per_method.items())
        if isinstance(sample, bool):
            p.add_argument(flag, dest=f"opt_{key}", action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            p.add_argument(flag, dest=f"opt_{key}", type=type(sample) if sample is not None else str,
                           default=None, help=help_)


def _add_fetch(sub) -> None:
    f = sub.add_parser("fetch", help="fetch a real model into ~/.cache/lowbit/models")
    f.add_argument("name")
    f.set_defaults(handler=_run_fetch)


def _run_fetch(args) -> None:
    from .zoo import fetch
    print(fetch(args.name, progress=not args.quiet))


def _add_quantize(sub) -> None:
    q = sub.add_parser("quantize", help="quantize a model layer by layer")
    q.add_argument("--model-path", required=True, help="checkpoint dir, .gguf file or hub id")
    q.add_argument("--output-dir", required=True)
    q.add_argument("--method", default="rtn")
    q.add_argument("--bits", type=int, default=4)
    q.add_argument("--group-size", type=int, default=128, help="0 = per-channel")
    q.add_argument("--sym", action="store_true", help="symmetric grid (default asymmetric)")
    q.add_argument("--weight-format", default="int", help="number format of the grid")
    q.add_argument("--format", dest="export_format", default="compressed-tensors",
                   help="output: compressed-tensors (default), fake (dequantized weights), gptq, autoawq, "
                        "or gguf (with --weight-format gguf:<type>)")
    q.add_argument("--calib-dataset", default="default")
    q.add_argument("--n-calib", type=int, default=128)
    q.add_argument("--calib-batch-size", type=int, default=8,
                   help="windows per forward pass; under torchrun, batch j runs on process j mod N")
    q.add_argument("--seq-len", type=int, default=512)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--device", default="cpu")
    q.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    q.add_argument("--layer-batch-size", type=int, default=16)
    q.add_argument("--lmhead-chunks", type=int, default=4)
    q.add_argument("--quantize-lm-head", action="store_true")
    q.add_argument("--layers", default=None, help="only these decoder layers, e.g. 0-1,5")
    q.add_argument("--overwrite", action="store_true")
    q.add_argument("--resume", action="store_true")
    _method_flags(q)
    q.set_defaults(handler=_run_quantize)


def _torchrun(device: str):
    """This process's place among torchrun's (WORLD_SIZE > 1 in the environment), else None."""
    import os
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from .distributed import init
    return init(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")),
                device)


def _run_quantize(args) -> None:
    from .api import quantize
    from .distributed import shutdown
    options = {k[4:]: v for k, v in vars(args).items() if k.startswith("opt_") and v is not None}
    dist = _torchrun(args.device)
    if dist is not None and not dist.is_main:
        logging.getLogger().setLevel(logging.WARNING)  # one log: rank 0's
    out = quantize(args.model_path, args.output_dir, method=args.method, bits=args.bits,
                   group_size=args.group_size, sym=args.sym, fmt=args.weight_format,
                   export_format=args.export_format, calib_dataset=args.calib_dataset, n_calib=args.n_calib,
                   seq_len=args.seq_len, seed=args.seed, device=args.device, dtype=args.dtype,
                   layer_batch_size=args.layer_batch_size, lmhead_chunks=args.lmhead_chunks,
                   quantize_lm_head=args.quantize_lm_head, layers=args.layers, overwrite=args.overwrite,
                   resume=args.resume, progress=not args.quiet, calib_batch_size=args.calib_batch_size,
                   dist=dist, **options)
    shutdown()
    if dist is None or dist.is_main:
        print(out)


# A new command is a function `register(subparsers)` that sets `handler`; list it here.
COMMANDS: list[Callable] = [_add_fetch, _add_quantize, *EVAL_TOOLS, add_export]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lowbit", description="Quantize LLMs and measure what it cost.")
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    sub = ap.add_subparsers(dest="command", required=True)
    for register in COMMANDS:
        register(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args) or 0)  # a handler may return an exit status (gate: 1 = rejected)
    except LowbitError as e:
        print(f"lowbit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lowbit: interrupted; finished layers are kept in <output-dir>.partial, "
              "rerun the same command with --resume to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
