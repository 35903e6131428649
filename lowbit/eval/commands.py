"""Command-line registration for eval, compare, inspect, size, gate, recommend and report.

Each `add_*` is a ``register(subparsers)`` function listed in ``lowbit.cli.COMMANDS``; handlers
turn parsed arguments into calls of the pure functions and print. Only `lowbit.cli.main` reads argv.
A handler's return value is the exit status (None = 0).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import LowbitError

DEFAULT_RESERVE = "10%"  # vLLM's default gpu_memory_utilization of 0.9


# -- eval ---------------------------------------------------------------------------------------
def add_eval(sub) -> None:
    e = sub.add_parser("eval", help="KLD, perplexity and top-1 of one or more candidates against the base model; "
                                    "optionally on the base's own answers, on tasks, and serving figures")
    e.add_argument("--model-path", required=True, nargs="+", help="one or more candidates")
    e.add_argument("--base", required=True)
    e.add_argument("--text", default="moby-dick", help="held-out text: file, embedded name or hub dataset")
    e.add_argument("--no-text", action="store_true", help="skip the held-out text (e.g. only --tasks or --serving)")
    e.add_argument("--ctx", type=int, default=512)
    e.add_argument("--n-windows", type=int, default=None)
    e.add_argument("--device", default="cpu")
    e.add_argument("--batch-size", type=int, default=2)
    e.add_argument("--bootstrap", type=int, default=1000, help="resamples for 95%% CIs (0 = none)")
    e.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    e.add_argument("--no-cache", action="store_true",
                   help="keep no base hidden states or answers on disk (default: ~/.cache/lowbit/eval or "
                        "$LOWBIT_CACHE/eval); the base then runs beside each candidate")
    a = e.add_argument_group("KLD on the base's own answers (seed 000)")
    a.add_argument("--answers", action="store_true",
                   help="the base answers prompts through its chat template; candidates are scored on those tokens")
    a.add_argument("--prompts", default=None, help="prompt file: .jsonl (\"prompt\" field) or .txt (one a line); "
                                                   "default: the embedded set of 40")
    a.add_argument("--n-prompts", type=int, default=None, help="use the first N prompts")
    a.add_argument("--max-new-tokens", type=int, default=128, help="longest answer (default 128)")
    a.add_argument("--sample", action="store_true", help="seeded sampling instead of greedy answers")
    a.add_argument("--temperature", type=float, default=1.0)
    a.add_argument("--top-p", type=float, default=1.0)
    a.add_argument("--gen-seed", type=int, default=0, help="sampling seed")
    a.add_argument("--gen-batch-size", type=int, default=8, help="prompts generated together (default 8)")
    t = e.add_argument_group("tasks")
    t.add_argument("--tasks", default=None,
                   help="tasks .jsonl file, 'demo' (embedded), or lm-evaluation-harness task names (needs lm-eval)")
    t.add_argument("--task-limit", type=int, default=None, help="at most N items per task")
    s = e.add_argument_group("serving")
    s.add_argument("--serving", action="store_true",
                   help="prefill/decode tokens/s, p95 per-token latency and peak memory of base and candidates")
    s.add_argument("--serving-prompt", type=int, default=128, help="prompt tokens (default 128)")
    s.add_argument("--serving-new-tokens", type=int, default=64, help="decode steps (default 64)")
    s.add_argument("--serving-repeats", type=int, default=3)
    s.add_argument("--serving-dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    s.add_argument("--serving-in-process", action="store_true",
                   help="measure in this process (faster; peak memory then includes everything loaded before)")
    e.add_argument("--json", action="store_true")
    e.set_defaults(handler=run_eval)


def run_eval(args) -> None:
    from .suite import format_suite, suite_json
    if args.no_text and not (args.answers or args.tasks or args.serving):
        raise LowbitError("--no-text leaves nothing to measure; add --answers, --tasks or --serving")
    common = dict(device=args.device, progress=not args.quiet)
    text = answers = tasks = serving = None
    if not args.no_text:
        from .compare import evaluate_many
        text = evaluate_many(args.model_path, args.base, text=args.text, ctx=args.ctx, n_windows=args.n_windows,
                             batch_size=args.batch_size, use_cache=not args.no_cache, n_bootstrap=args.bootstrap,
                             seed=args.seed, **common)
    if args.answers:
        from .answers import GenerationConfig, evaluate_answers
        gen = GenerationConfig(args.max_new_tokens, args.sample, args.temperature, args.top_p, args.gen_seed,
                               args.gen_batch_size)
        answers = evaluate_answers(args.model_path, args.base, args.prompts, args.n_prompts, gen,
                                   use_cache=not args.no_cache, n_bootstrap=args.bootstrap, seed=args.seed, **common)
    if args.tasks:
        from .tasks import evaluate_tasks
        tasks = evaluate_tasks(args.model_path, args.base, args.tasks, limit=args.task_limit,
                               n_bootstrap=args.bootstrap, seed=args.seed, **common)
    if args.serving:
        from .serving import ServingConfig, bench_many
        cfg = ServingConfig(args.serving_prompt, args.serving_new_tokens, args.serving_repeats, args.device,
                            args.serving_dtype)
        serving = bench_many(args.model_path, args.base, cfg, isolate=not args.serving_in_process)
    if args.json:
        print(json.dumps(suite_json(args.model_path, args.base, text, answers, tasks, serving), indent=2))
    else:
        print(format_suite(text, answers, tasks, serving))


# -- compare ------------------------------------------------------------------------------------
def add_compare(sub) -> None:
    p = sub.add_parser("compare", help="two quantized models of one base side by side (e.g. dh-awq vs awq): "
                                       "ppl, KLD to the base and between them, per-layer weight differences, flips")
    p.add_argument("--heuristic-path", required=True, metavar="A", help="the candidate with the extra step (A)")
    p.add_argument("--standard-path", required=True, metavar="B", help="the reference method (B)")
    p.add_argument("--base", default=None, help="the float base (default: the source recorded in A's lowbit.json)")
    p.add_argument("--n-samples", type=int, default=40,
                   help="held-out windows of --ctx tokens to score (capped at what the text holds; 0 = weights only)")
    p.add_argument("--text", default="moby-dick")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--out", default=None, help="write the plot (OUT.png) and every figure (OUT.json)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=run_compare)


def run_compare(args) -> None:
    from .pair import compare_pair, format_pair, plot_pair
    if args.n_samples < 0:
        raise LowbitError("--n-samples must be 0 (weights only) or more")
    kw = {} if args.n_samples == 0 else dict(text=args.text, ctx=args.ctx, device=args.device,
                                             batch_size=args.batch_size, progress=not args.quiet,
                                             use_cache=not args.no_cache, n_bootstrap=args.bootstrap)
    rep = compare_pair(args.heuristic_path, args.standard_path, args.base, n_windows=args.n_samples, **kw)
    if args.out:
        out = Path(args.out)
        out = out if out.suffix == ".png" else out.with_suffix(".png")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(plot_pair(rep))
        out.with_suffix(".json").write_text(json.dumps(rep.to_json(), indent=2))
    if args.json:
        print(json.dumps(rep.to_json(), indent=2))
    else:
        print(format_pair(rep) + (f"\nplot: {out}" if args.out else ""))


# -- inspect ------------------------------------------------------------------------------------
def add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="per-tensor error of a quantized checkpoint against its source")
    p.add_argument("a", metavar="A", help="quantized checkpoint (compressed-tensors, GPTQ, fake or plain)")
    p.add_argument("b", metavar="B", nargs="?", default=None,
                   help="source checkpoint (default: the source recorded in A/lowbit.json)")
    p.add_argument("--sort", choices=["cos", "rel_rms", "max_abs", "name"], default=None,
                   help="worst first (default: checkpoint order)")
    p.add_argument("--top", type=int, default=None, help="show only the first N rows")
    p.add_argument("--changed-only", action="store_true", help="hide tensors identical to the source")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=run_inspect)


def run_inspect(args) -> None:
    from .inspect import format_errors, inspect_checkpoint, recorded_source, sort_errors
    from ..model.source import resolve_model_dir
    source = args.b if args.b is not None else recorded_source(resolve_model_dir(args.a))
    errors = inspect_checkpoint(args.a, source)
    if args.changed_only:
        errors = [e for e in errors if e.rel_rms > 0]
    errors = sort_errors(errors, args.sort)[: args.top]
    if args.json:
        print(json.dumps({"model": args.a, "source": source, "tensors": [e.to_json() for e in errors]}, indent=2))
    else:
        print(f"{args.a} vs {source}\n{format_errors(errors)}")


# -- size ---------------------------------------------------------------------------------------
def add_size(sub) -> None:
    p = sub.add_parser("size", help="memory for weights in every format, KV cache, and the fit on a GPU")
    p.add_argument("model", help="config.json, model directory or hub id (only config.json is fetched)")
    p.add_argument("--scheme", action="append", default=None,
                   help="fp16, bf16, fp32, int2..int8[-g<N>][-sym] or a registered format; repeatable "
                        "(default: 16-bit, int8/4/3/2 and every registered format)")
    p.add_argument("--group-size", type=int, default=128, help="group size of the default schemes (0 = per-channel)")
    p.add_argument("--sym", action="store_true", help="symmetric default schemes (no zero points)")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default=None,
                   help="dtype of the tensors that stay unquantized (default: as stored)")
    p.add_argument("--quantize-lm-head", action="store_true")
    p.add_argument("--ctx", type=int, default=4096, help="context length for the KV cache")
    p.add_argument("--batch", type=int, default=1, help="concurrent sequences")
    p.add_argument("--kv-dtype", choices=["fp16", "bf16", "fp8", "int8", "fp32"], default="fp16")
    p.add_argument("--gpu-mem", default=None, help="GPU memory, e.g. 24GiB or 80GB")
    p.add_argument("--reserve", default=DEFAULT_RESERVE,
                   help=f"share of GPU memory kept for activations and runtime (default {DEFAULT_RESERVE})")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=run_size)


def run_size(args) -> None:
    import torch
    from .size import (KV_BYTES, default_schemes, format_size_table, model_shape, parse_bytes, parse_fraction,
                       parse_scheme, size_table)
    shape = model_shape(args.model)
    if args.scheme:
        schemes = [parse_scheme(s, args.group_size, args.sym) for s in args.scheme]
    else:
        schemes = default_schemes(args.group_size, args.sym)
        if shape.dtype == torch.float32:
            schemes.insert(0, parse_scheme("fp32"))
    gpu = parse_bytes(args.gpu_mem) if args.gpu_mem else None
    reserve = parse_fraction(args.reserve)
    keep = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}.get(args.dtype)
    rows = size_table(shape, schemes, args.ctx, args.batch, KV_BYTES[args.kv_dtype], gpu, reserve, keep,
                      args.quantize_lm_head)
    if args.json:
        print(json.dumps({"model": args.model, "model_type": shape.model_type, "params": shape.params,
                          "layers": shape.layers, "kv_heads": shape.kv_heads, "head_dim": shape.head_dim,
                          "ctx": args.ctx, "batch": args.batch, "kv_dtype": args.kv_dtype, "gpu_mem": gpu,
                          "reserve": reserve, "rows": [r.to_json() for r in rows]}, indent=2))
    else:
        print(format_size_table(shape, rows, args.ctx, args.batch, args.kv_dtype, gpu, reserve))


# -- gate ---------------------------------------------------------------------------------------
def add_gate(sub) -> None:
    p = sub.add_parser("gate", help="approve or reject candidates: drift, task regressions, serving")
    p.add_argument("results", help="eval JSON (lowbit eval --json), optionally with tasks/serving figures")
    p.add_argument("--thresholds", default=None, help="YAML/JSON file with the thresholds below (flags win)")
    p.add_argument("--max-kld", type=float, default=None, help="mean KLD to the base, nats")
    p.add_argument("--min-top1", type=float, default=None, help="top-1 agreement with the base, 0..1")
    p.add_argument("--max-ppl-increase", default=None, help="relative perplexity increase, e.g. 3%%")
    p.add_argument("--max-task-drop", default=None, help="accuracy drop per task in points, e.g. 1%%")
    p.add_argument("--max-memory", default=None, help="serving memory, e.g. 8GiB")
    p.add_argument("--min-tokens-per-s", type=float, default=None, help="decode tokens/s (lowbit eval --serving)")
    p.add_argument("--min-prefill-tokens-per-s", type=float, default=None)
    p.add_argument("--max-p95-latency", default=None, help="p95 per-token decode latency, e.g. 50ms or 0.05s")
    p.add_argument("--max-p95-ms", type=float, default=None, help="the same in milliseconds")
    p.add_argument("--use-ci", action="store_true", help="judge the pessimistic end of the 95%% intervals")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=run_gate)


def run_gate(args) -> int:
    from .gate import format_verdicts, gate_all, results_list, thresholds_from_dict
    spec: dict = {}
    if args.thresholds:
        spec.update(_read_mapping(Path(args.thresholds)))
    for key in ("max_kld", "min_top1", "max_ppl_increase", "max_task_drop", "max_memory", "min_tokens_per_s",
                "min_prefill_tokens_per_s", "max_p95_latency", "max_p95_ms"):
        if getattr(args, key) is not None:
            spec[key] = getattr(args, key)
    if args.use_ci:
        spec["use_ci"] = True
    th = thresholds_from_dict(spec)
    try:
        doc = json.loads(Path(args.results).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LowbitError(f"cannot read results {args.results}: {e}") from None
    verdicts = gate_all(results_list(doc), th)
    if args.json:
        print(json.dumps({"passed": all(v.passed for v in verdicts), "verdicts": [v.to_json() for v in verdicts]},
                         indent=2))
    else:
        print(format_verdicts(verdicts))
    return 0 if all(v.passed for v in verdicts) else 1


def _read_mapping(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as e:
        raise LowbitError(f"cannot read thresholds {path}: {e}") from None
    if path.suffix == ".json":
        data = json.loads(text)
    else:
        import yaml
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise LowbitError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise LowbitError(f"{path} must hold a mapping of threshold names to values")
    return data


# -- recommend ----------------------------------------------------------------------------------
def add_recommend(sub) -> None:
    p = sub.add_parser("recommend", help="format + method for a runtime, hardware and memory budget")
    p.add_argument("--runtime", required=True, help="vllm, llama.cpp or transformers")
    p.add_argument("--hardware", required=True, help="GPU name (e.g. 'RTX 4090', H100, A100-40GB), cpu or apple")
    p.add_argument("--memory", default=None, help="memory budget, e.g. 24GiB (default: the GPU's memory)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="config.json, model dir or hub id (exact sizes)")
    src.add_argument("--params", help="parameter count, e.g. 8B or 135M (approximate sizes, no KV cache)")
    p.add_argument("--ctx", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--kv-dtype", choices=["fp16", "bf16", "fp8", "int8", "fp32"], default="fp16")
    p.add_argument("--reserve", default=DEFAULT_RESERVE, help=f"share kept for runtime (default {DEFAULT_RESERVE})")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=run_recommend)


def run_recommend(args) -> None:
    from ..algorithms import METHODS
    from ..export import EXPORTERS
    from ..formats import FORMATS
    from .recommend import parse_hardware, recommend
    from .size import format_bytes, parse_bytes, parse_fraction
    hw = parse_hardware(args.hardware)
    memory = parse_bytes(args.memory) if args.memory else hw.memory
    if memory is None:
        raise LowbitError(f"memory of {args.hardware!r} unknown; pass --memory, e.g. --memory 32GiB")
    budget = int(memory * (1 - parse_fraction(args.reserve)))
    if args.model:
        needs, gs = needs_from_model(args.model, args.ctx, args.batch, args.kv_dtype)
    else:
        needs, gs = needs_from_params(_parse_count(args.params))
    rec = recommend(args.runtime, hw, budget, needs, model=args.model or "MODEL", group_size=gs,
                    methods=tuple(METHODS), formats=tuple(FORMATS), exporters=tuple(EXPORTERS))
    if args.json:
        print(json.dumps(rec.to_json(), indent=2))
        return
    lines = [f"runtime {rec.runtime} on {hw.name} ({hw.kind}{', native FP8' if hw.fp8 else ''}), "
             f"budget {format_bytes(budget)}",
             f"format:  {rec.format}", f"method:  {rec.method}", f"why:     {rec.reason}",
             f"fits:    {'yes' if rec.fits else 'no'} (needs {format_bytes(rec.needs_bytes)})"]
    lines += [f"also:    {a}" for a in rec.alternatives] + [f"note:    {n}" for n in rec.notes]
    if rec.command:
        lines.append(f"run:     {rec.command}")
    lines.append("then:    lowbit eval + lowbit gate before serving it")
    print("\n".join(lines))


def _parse_count(s: str) -> int:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMbBtT]?)\s*", s)
    if not m:
        raise LowbitError(f"cannot read {s!r} as a parameter count; write e.g. 8B or 135M")
    return int(float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[m.group(2).lower()])


def needs_from_params(params: int):
    """Approximate needs from a parameter count (weights only; int at g128 with fp16 scales)."""
    from .recommend import GGUF_BPW, Needs
    bpw = {"bf16": 16, "fp8": 8 + 16 / 4096, "int8": 8 + 16 / 4096, "int4": 4 + 20 / 128, "int3": 3 + 19 / 128}
    total = {k: int(params * v / 8) for k, v in {**bpw, **GGUF_BPW}.items()}
    return Needs(total, 0, 1), 128


def needs_from_model(model: str, ctx: int, batch: int, kv_dtype: str):
    """Exact needs (weights + KV) from the model's tensors; int4/int3 at the largest group size
    among 128/64/32 that divides every linear (else per-channel)."""
    import torch
    from .recommend import GGUF_BPW, Needs
    from .size import KV_BYTES, kv_cache_bytes, model_shape, parse_scheme, weight_size
    shape = model_shape(model)
    ins = {t.shape[1] for t in shape.tensors if t.role == "linear"}
    gs = next((g for g in (128, 64, 32) if all(i % g == 0 for i in ins)), 0)
    kv = kv_cache_bytes(shape.layers, shape.kv_heads, shape.head_dim, ctx, batch, KV_BYTES[kv_dtype])
    w = lambda s: weight_size(shape, parse_scheme(s), keep_dtype=torch.bfloat16).total_bytes  # noqa: E731
    total = {"bf16": w("bf16"), "fp8": w("int8-g0-sym"), "int8": w("int8-g0-sym"), "int4": w(f"int4-g{gs}"),
             "int3": w(f"int3-g{gs}")}
    per_layer_params = sum(t.numel for t in shape.tensors if t.role == "linear") / max(shape.layers, 1)
    total.update({q: int(shape.params * b / 8) for q, b in GGUF_BPW.items()})
    total = {k: v + kv for k, v in total.items()}
    per_layer = {q: int(per_layer_params * b / 8) for q, b in GGUF_BPW.items()}
    return Needs(total, kv, shape.layers, per_layer), gs


# -- report -------------------------------------------------------------------------------------
def add_report(sub) -> None:
    p = sub.add_parser("report", help="HTML + Markdown report from eval (and inspect) results")
    p.add_argument("results", nargs="+", help="eval JSON files (lowbit eval --json)")
    p.add_argument("--inspect", action="append", default=[], help="inspect JSON (lowbit inspect --json); repeatable")
    p.add_argument("--run-inspect", action="store_true",
                   help="inspect every candidate that has a lowbit.json (reads both checkpoints tensor by tensor)")
    p.add_argument("--out", default="lowbit-report", help="writes OUT.html, OUT.md and OUT_files/")
    p.add_argument("--title", default="lowbit evaluation report")
    p.set_defaults(handler=run_report)


def run_report(args) -> None:
    from .report import write_report
    html_path, md_path = write_report(Path(args.out), args.results, args.inspect, args.title, args.run_inspect)
    print(f"{html_path}\n{md_path}")


COMMANDS = [add_eval, add_compare, add_inspect, add_size, add_gate, add_recommend, add_report]

