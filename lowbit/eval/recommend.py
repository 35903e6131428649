"""The decision guide as code: from runtime, hardware and memory budget to a format and a method.

Rules (the evaluation guide's decision table, in order):
  * CPU or Apple Silicon, or llama.cpp as the runtime      -> GGUF, the best k-quant that fits
  * GPU, and the model does not fit even at 4 bits         -> GGUF with partial offload
  * GPU with a native FP8 path, FP8 fits                   -> FP8 (+ KV-cache tuning)
  * GPU, 16-bit fits                                       -> no quantization needed for memory
  * GPU, INT8 fits                                         -> INT8 weight-only (near lossless)
  * GPU, INT4 fits                                         -> INT4 W4A16 with AWQ or GPTQ
and, on top: a KV cache that takes a large share of the budget calls for an fp8 KV cache.
Every recommendation is a starting point to benchmark and gate, not a verdict.

Pure: `recommend` takes the bytes each candidate needs (weights + KV, computed by `size`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import LowbitError
from .size import format_bytes

RUNTIMES = {"vllm": "vllm", "sglang": "vllm", "transformers": "transformers", "hf": "transformers",
            "llama.cpp": "llama.cpp", "llamacpp": "llama.cpp", "llama-cpp": "llama.cpp", "gguf": "llama.cpp",
            "ollama": "llama.cpp", "lmstudio": "llama.cpp"}

# GGUF k-quants, best first, with their typical bits per weight (llama.cpp's quantize table)
GGUF_BPW = {"Q8_0": 8.5, "Q6_K": 6.56, "Q5_K_M": 5.69, "Q4_K_M": 4.85, "Q3_K_M": 3.91, "Q2_K": 2.96}

# name fragment -> (memory GiB, native FP8 tensor cores); longest fragment wins
GPUS: dict[str, tuple[float, bool]] = {
    "b200": (180, True), "gb200": (186, True), "b100": (180, True), "h200": (141, True), "h100nvl": (94, True),
    "h100": (80, True), "h800": (80, True), "h20": (96, True), "gh200": (96, True), "l40s": (48, True),
    "l40": (48, True), "l4": (24, True), "rtx6000ada": (48, True), "rtx5090": (32, True), "rtx5080": (16, True),
    "rtx4090": (24, True), "rtx4080": (16, True), "rtx4070ti": (12, True), "rtx4070": (12, True),
    "rtx4060ti": (16, True), "rtx4060": (8, True), "mi300x": (192, True), "mi325x": (256, True),
    "a100": (80, False), "a100-40gb": (40, False), "a800": (80, False), "a10g": (24, False), "a10": (24, False),
    "a6000": (48, False), "a40": (48, False), "rtx3090": (24, False), "rtx3080": (10, False), "rtx3060": (12, False),
    "t4": (16, False), "v100": (32, False), "mi250": (128, False), "mi210": (64, False),
}


@dataclass(frozen=True)
class Hardware:
    name: str
    kind: str                 # "gpu", "cpu" or "apple"
    memory: int | None       # bytes of GPU (or unified/system) memory, when known
    fp8: bool = False


def parse_hardware(name: str) -> Hardware:
    """'RTX 4090', 'H100', 'A100-40GB', 'cpu', 'apple m3 max' -> Hardware (memory from the table)."""
    key = re.sub(r"[\s_]+", "", name.lower()).replace("nvidia", "").replace("geforce", "")
    if key in ("cpu", "x86", "arm", "none"):
        return Hardware(name, "cpu", None)
    if key.startswith(("apple", "m1", "m2", "m3", "m4", "mac")):
        return Hardware(name, "apple", None)
    mem_m = re.search(r"(\d+)gb", key)
    for frag in sorted(GPUS, key=len, reverse=True):
        if frag.replace("-", "").removeprefix("rtx") in key.replace("-", ""):
            gib, fp8 = GPUS[frag]
            gib = float(mem_m.group(1)) if mem_m else gib
            return Hardware(name, "gpu", int(gib * 2**30), fp8)
    return Hardware(name, "gpu", int(float(mem_m.group(1)) * 2**30) if mem_m else None, False)


@dataclass(frozen=True)
class Recommendation:
    runtime: str
    format: str
    method: str
    reason: str
    fits: bool
    needs_bytes: int | None
    budget_bytes: int
    alternatives: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    command: str | None = None

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        d["alternatives"], d["notes"] = list(self.alternatives), list(self.notes)
        return d


@dataclass(frozen=True)
class Needs:
    """Bytes each candidate needs in memory (weights + KV cache), and the pieces partial offload uses."""

    total: dict[str, int]            # keys: "bf16", "fp8", "int8", "int4", "int3" and GGUF_BPW names
    kv_bytes: int
    layers: int
    per_layer_bytes: dict[str, int] = field(default_factory=dict)  # GGUF name -> bytes of one decoder layer


def _pick_method(preferred: tuple[str, ...], methods: tuple[str, ...]) -> tuple[str, list[str]]:
    have = [m for m in preferred if m in methods]
    chosen = have[0] if have else (methods[0] if methods else "rtn")
    alts = [f"method {m}" for m in have[1:]]
    alts += [f"method {m} (not registered in this lowbit; use another tool, then `lowbit eval` it)"
             for m in preferred if m not in methods]
    return chosen, alts


def recommend(runtime: str, hw: Hardware, budget: int, needs: Needs, model: str = "MODEL",
              group_size: int = 128, methods: tuple[str, ...] = ("rtn", "gptq", "awq"),
              formats: tuple[str, ...] = (), exporters: tuple[str, ...] = ()) -> Recommendation:
    """Starting format + method for `runtime` on `hw` with `budget` usable bytes.

    `methods`, `formats` and `exporters` name what this lowbit has (the registries), so the notes
    say whether lowbit can write the artifact or another tool must.
    """
    rt = RUNTIMES.get(runtime.lower())
    if rt is None:
        raise LowbitError(f"unknown runtime {runtime!r}; choose vllm, llama.cpp or transformers")
    need = needs.total
    notes = []
    if needs.kv_bytes > 0.25 * budget:
        notes.append(f"the KV cache alone takes {format_bytes(needs.kv_bytes)} "
                     f"({needs.kv_bytes / budget:.0%} of the budget): use an fp8 KV cache "
                     "(vLLM --kv-cache-dtype fp8, llama.cpp -ctk q8_0 -ctv q8_0) or a shorter context")
    fits = lambda k: k in need and need[k] <= budget  # noqa: E731
    head = dict(budget_bytes=budget)

    if rt == "llama.cpp" or hw.kind in ("cpu", "apple"):
        if rt != "llama.cpp":
            notes.append(f"{rt} GPU kernels do not serve {hw.kind}; GGUF on llama.cpp is the common local path")
        for q in GGUF_BPW:
            if fits(q):
                low = GGUF_BPW[q] < 5
                return Recommendation(
                    "llama.cpp", f"GGUF {q}", "imatrix (importance matrix from target-domain text)" if low else "none",
                    f"{q} needs {format_bytes(need[q])} of {format_bytes(budget)}: the largest k-quant that fits",
                    True, need[q], **head, alternatives=tuple(k for k in GGUF_BPW if k != q and fits(k))[:2],
                    notes=tuple(notes + [_gguf_note(q, formats, exporters)]))
        return _offload(hw, budget, needs, notes, head)

    # a GPU runtime with GPU kernels
    if not fits("int4"):
        rec = _offload(hw, budget, needs, notes, head)
        alts = list(rec.alternatives)
        if fits("int3"):
            alts.insert(0, f"int3 g{group_size} GPTQ on {rt} ({format_bytes(need['int3'])}): fits, but 3-bit "
                           "quality drops sharply — gate it on your tasks")
        return Recommendation(rec.runtime, rec.format, rec.method,
                              f"even int4 needs {format_bytes(need.get('int4'))} of {format_bytes(budget)}; "
                              + rec.reason, rec.fits, rec.needs_bytes, **head, alternatives=tuple(alts),
                              notes=rec.notes)
    ct = "compressed-tensors pack-quantized"
    if hw.fp8 and fits("fp8"):
        why = ("16-bit fits too; FP8 halves weight traffic on native FP8 tensor cores with less quality risk "
               "than INT4" if fits("bf16") else
               f"16-bit needs {format_bytes(need['bf16'])}; FP8 fits and is a milder step than INT4 "
               "on native FP8 hardware")
        return Recommendation(rt, "FP8 (W8A8, per-channel weights, dynamic per-token activations)", "rtn",
                              f"{hw.name} has a native FP8 path; {why}", True, need["fp8"], **head,
                              alternatives=(f"int4 g{group_size} AWQ/GPTQ ({format_bytes(need['int4'])}) if you need "
                                            "the memory for batch or context",),
                              notes=tuple(notes + [_fp8_note(formats)]),
                              command=(f"lowbit quantize --model-path {model} --output-dir out-fp8 --weight-format "
                                       "fp8_e4m3 --bits 8 --group-size 0 --format fake" if "fp8_e4m3" in formats
                                       else None))
    if fits("bf16"):
        return Recommendation(rt, "bf16 (no quantization)", "none",
                              f"16-bit weights fit ({format_bytes(need['bf16'])} of {format_bytes(budget)}); "
                              "quantize only for throughput or more concurrent sequences", True, need["bf16"], **head,
                              alternatives=(f"int8 W8A16 ({format_bytes(need['int8'])})",
                                            f"int4 g{group_size} AWQ/GPTQ ({format_bytes(need['int4'])})"),
                              notes=tuple(notes))
    if fits("int8"):
        m, alts = _pick_method(("gptq", "rtn"), methods)
        return Recommendation(rt, f"{ct} int8 per-channel (W8A16)", m,
                              f"16-bit needs {format_bytes(need['bf16'])}; int8 fits ({format_bytes(need['int8'])}) "
                              "and is close to lossless", True, need["int8"], **head,
                              alternatives=(f"int4 g{group_size} AWQ/GPTQ ({format_bytes(need['int4'])}) for more "
                                            "throughput", *alts), notes=tuple(notes),
                              command=f"lowbit quantize --model-path {model} --output-dir out-int8 --method {m} "
                                      "--bits 8 --group-size 0 --sym")
    m, alts = _pick_method(("awq", "gptq"), methods)
    return Recommendation(rt, f"{ct} int4 g{group_size} (W4A16)", m,
                          f"int8 needs {format_bytes(need['int8'])}; int4 fits ({format_bytes(need['int4'])} of "
                          f"{format_bytes(budget)}) and stays GPU-resident on specialized kernels", True, need["int4"],
                          **head, alternatives=tuple(alts), notes=tuple(notes),
                          command=f"lowbit quantize --model-path {model} --output-dir out-int4 --method {m} "
                                  f"--bits 4 --group-size {group_size}")


def _gguf_note(q: str, formats: tuple[str, ...], exporters: tuple[str, ...]) -> str:
    name = f"gguf:{q.lower().split('_m')[0]}"
    if "gguf" in exporters and name in formats:
        return f"lowbit writes it: lowbit quantize --weight-format {name} --format gguf; `lowbit eval` reads .gguf"
    return "`lowbit eval` reads .gguf; write the file with llama.cpp's llama-quantize (imatrix for <= 4 bits)"


def _fp8_note(formats: tuple[str, ...]) -> str:
    if "fp8_e4m3" in formats:
        return ("lowbit's fp8_e4m3 format measures the quality (fake-quant output for `lowbit eval`); lowbit has "
                "no FP8 exporter, so serve with vLLM --quantization fp8 or llm-compressor")
    return "lowbit has no fp8 format: use vLLM --quantization fp8 or llm-compressor, then `lowbit eval` it"


def _offload(hw: Hardware, budget: int, needs: Needs, notes: list[str], head: dict) -> Recommendation:
    """GGUF Q4_K_M with as many decoder layers on the GPU as fit (or nothing fits at all)."""
    q = "Q4_K_M"
    need = needs.total.get(q)
    if hw.kind != "gpu" or need is None:
        smallest = min((v, k) for k, v in needs.total.items() if k in GGUF_BPW) if needs.total else (None, "Q2_K")
        return Recommendation("llama.cpp", f"GGUF {smallest[1]}", "imatrix", f"no GGUF quant fits in "
                              f"{format_bytes(budget)} of {hw.kind} memory (smallest: {format_bytes(smallest[0])}); "
                              "use a smaller model or more memory", False, smallest[0], **head, notes=tuple(notes))
    if needs.layers <= 1 or q not in needs.per_layer_bytes:  # layer sizes unknown: a share of the weights
        share = max(0.0, min(1.0, (budget - needs.kv_bytes) / max(need - needs.kv_bytes, 1)))
        placement, ngl = f"~{share:.0%} of the weights on GPU", "N"
    else:
        per_layer = needs.per_layer_bytes[q]
        rest = need - needs.kv_bytes - per_layer * needs.layers  # embeddings, lm_head, norms
        gpu_layers = int(max(0, min(needs.layers, (budget - needs.kv_bytes - rest) // max(per_layer, 1))))
        placement, ngl = f"{gpu_layers}/{needs.layers} layers on GPU", str(gpu_layers)
    return Recommendation("llama.cpp", f"GGUF {q} with partial offload ({placement})",
                          "imatrix (importance matrix from target-domain text)",
                          f"GGUF lets system RAM absorb what the GPU cannot hold ({format_bytes(need)} needed)",
                          False, need, **head, alternatives=("a larger GPU or tensor parallelism for full residency",),
                          notes=tuple(notes + [f"even-size estimate: measure real placement with llama.cpp "
                                               f"-ngl {ngl}"]))
