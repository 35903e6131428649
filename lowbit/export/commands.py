"""Command-line registration for ``lowbit export`` (one sub-command per target; GGUF for now).

`add_export` is a ``register(subparsers)`` function listed in ``lowbit.cli.COMMANDS``.
"""
from __future__ import annotations


def add_export(sub) -> None:
    p = sub.add_parser("export", help="convert a checkpoint (float or quantized) to another runtime's format")
    targets = p.add_subparsers(dest="target", required=True)
    g = targets.add_parser("gguf", help="a GGUF file for llama.cpp (float, compressed-tensors, GPTQ or AutoAWQ input)")
    g.add_argument("--model-path", required=True, help="checkpoint dir, .gguf file or hub id (only read)")
    g.add_argument("--type", default="Q8_0",
                   help="llama.cpp preset: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K_S/M/L, "
                        "Q4_K_S/M, Q5_K_S/M, Q6_K (default Q8_0)")
    g.add_argument("--imatrix", default=None, help="llama.cpp importance matrix (.dat or .gguf) for the encoders")
    g.add_argument("--output", required=True, help="the .gguf file to write (atomically)")
    g.add_argument("--overwrite", action="store_true")
    g.set_defaults(handler=run_export_gguf)


def run_export_gguf(args) -> None:
    from .gguf import export_gguf
    report = export_gguf(args.model_path, args.output, args.type, imatrix=args.imatrix, overwrite=args.overwrite)
    print(report.path)
