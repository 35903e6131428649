"""The command line: the only place that reads argv and the environment."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Callable

from .errors import LowbitError
from .eval.commands import COMMANDS as EVAL_TOOLS  # inspect, size, gate, recommend, report


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
                   help="output: compressed-tensors (default) or fake (dequantized weights)")
    q.add_argument("--calib-dataset", default="default")
    q.add_argument("--n-calib", type=int, default=128)
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


def _run_quantize(args) -> None:
    from .api import quantize
    options = {k[4:]: v for k, v in vars(args).items() if k.startswith("opt_") and v is not None}
    out = quantize(args.model_path, args.output_dir, method=args.method, bits=args.bits,
                   group_size=args.group_size, sym=args.sym, fmt=args.weight_format,
                   export_format=args.export_format, calib_dataset=args.calib_dataset, n_calib=args.n_calib,
                   seq_len=args.seq_len, seed=args.seed, device=args.device, dtype=args.dtype,
                   layer_batch_size=args.layer_batch_size, lmhead_chunks=args.lmhead_chunks,
                   quantize_lm_head=args.quantize_lm_head, layers=args.layers, overwrite=args.overwrite,
                   resume=args.resume, progress=not args.quiet, **options)
    print(out)


def _add_eval(sub) -> None:
    e = sub.add_parser("eval", help="KLD, perplexity and top-1 of one or more candidates against the base model")
    e.add_argument("--model-path", required=True, nargs="+", help="one or more candidates")
    e.add_argument("--base", required=True)
    e.add_argument("--text", default="moby-dick", help="held-out text: file, embedded name or hub dataset")
    e.add_argument("--ctx", type=int, default=512)
    e.add_argument("--n-windows", type=int, default=None)
    e.add_argument("--device", default="cpu")
    e.add_argument("--batch-size", type=int, default=2)
    e.add_argument("--bootstrap", type=int, default=1000, help="resamples of windows for 95%% CIs (0 = none)")
    e.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    e.add_argument("--no-cache", action="store_true",
                   help="keep no base logits on disk (default: ~/.cache/lowbit/eval or $LOWBIT_CACHE/eval, "
                        "n_windows × ctx × vocab × 4 bytes); the base then runs beside each candidate")
    e.add_argument("--json", action="store_true")
    e.set_defaults(handler=_run_eval)


def _run_eval(args) -> None:
    from .eval.compare import evaluate_many, format_many, results_json
    res = evaluate_many(args.model_path, args.base, text=args.text, ctx=args.ctx, n_windows=args.n_windows,
                        device=args.device, batch_size=args.batch_size, progress=not args.quiet,
                        use_cache=not args.no_cache, n_bootstrap=args.bootstrap, seed=args.seed)
    print(json.dumps(results_json(res), indent=2) if args.json else format_many(res))


# A new command is a function `register(subparsers)` that sets `handler`; list it here.
COMMANDS: list[Callable] = [_add_fetch, _add_quantize, _add_eval, *EVAL_TOOLS]


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
