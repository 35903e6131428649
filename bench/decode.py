"""bench/decode.py — greedy decode tokens/s of a random-weight Llama-3-8B-shaped model: fp16 vs lowbit W4.

The model is built from a config on the GPU (hidden 4096, intermediate 14336, 32 layers, 32 heads,
8 kv heads, vocab 128256; nothing to download) and quantized in memory with lowbit's IntFormat
(RTN, 4 bits, group 128, asymmetric; the lm_head stays fp16 as lowbit's pipeline leaves it, and a
second W4 row quantizes it too). Both precisions decode through the same path, lowbit.runtime's
Decoder (static KV cache, fused step, one CUDA graph per token); transformers' own generate loop
is timed too, for reference, on a few tokens.

    python bench/decode.py [--out DIR] [--new-tokens 256] [--layers 32]
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch
import triton
from transformers import AutoModelForCausalLM, LlamaConfig

from lowbit.formats.int import IntFormat
from lowbit.kernels import QuantLinear
from lowbit.runtime import Decoder, quantize_linears_
from common import table
from kernel import copy_bandwidth


def llama3_8b_config(layers: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                       rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001)


def sync_time() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


def hf_generate(model, prompt: torch.Tensor, n: int) -> tuple[float, torch.Tensor]:
    """transformers' eager generate (DynamicCache): tokens/s over n new tokens (prompt pass included)."""
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    model.generate(prompt, max_new_tokens=3, do_sample=False)  # warm-up (and kernel tuning)
    t = sync_time()
    out = model.generate(prompt, max_new_tokens=n, do_sample=False)
    return n / (sync_time() - t), out[0, prompt.shape[1]:]


def time_decoder(dec: Decoder, prompt: torch.Tensor, n: int, trials: int = 3) -> tuple[float, torch.Tensor]:
    """Decode tokens/s (prompt excluded): n graph replays after a prefill, median of `trials`."""
    T = prompt.shape[1]
    rates = []
    for _ in range(trials):
        dec.prefill(prompt)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dec.decode(n)
        b.record()
        b.synchronize()
        rates.append(n / (a.elapsed_time(b) * 1e-3))
    return sorted(rates)[trials // 2], dec.tokens[T:T + n + 1].clone()


def kernel_breakdown(dec: Decoder, prompt: torch.Tensor, steps: int = 8) -> str:
    """Device time per token by kernel name over `steps` graph replays (torch.profiler / CUPTI)."""
    from torch.profiler import ProfilerActivity, profile
    dec.prefill(prompt)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        dec.decode(steps)
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t:
            rows.append((t / steps, e.count / steps, e.key[:70]))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows)
    lines = [f"  {'us/token':>9} {'calls':>6}  kernel   (device total {total / 1e3:.2f} ms/token)"]
    lines += [f"  {t:9.1f} {c:6.0f}  {k}" for t, c, k in rows[:14]]
    return "\n".join(lines)


def agree(a: torch.Tensor, b: torch.Tensor) -> int:
    """Length of the common prefix of two token sequences."""
    n = min(len(a), len(b))
    diff = (a[:n].cpu() != b[:n].cpu()).nonzero()
    return int(diff[0]) if len(diff) else n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--hf-tokens", type=int, default=24)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--tag", default="h100")
    ap.add_argument("--tune", action="store_true", help="W4 rows: Decoder.tune() (kernel configs timed in the step)")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    props = torch.cuda.get_device_properties(0)
    copy_bw = copy_bandwidth()
    torch.manual_seed(0)
    t = time.perf_counter()
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(llama3_8b_config(args.layers), dtype=torch.float16).eval()
    print(f"built random model in {time.perf_counter() - t:.1f} s, "
          f"{torch.cuda.memory_allocated() / 2**30:.1f} GiB", flush=True)
    prompt = torch.randint(0, 128000, (1, args.prompt_tokens), device="cuda")
    max_len = args.prompt_tokens + args.new_tokens + 8
    fmt = IntFormat(4, args.group_size, sym=False, scale_dtype=torch.float16)
    rows = []
    breakdowns = []

    def measure(name: str, dec: Decoder, ref_tokens: torch.Tensor | None, hf_tps: float | None) -> None:
        torch.cuda.reset_peak_memory_stats()
        tps, toks = time_decoder(dec, prompt, args.new_tokens)
        wb = dec.weight_bytes()
        ms = 1e3 / tps
        rows.append({"variant": name, "tok_s": tps, "ms_token": ms, "weights_GB": wb / 1e9,
                     "bw_TBs": wb / (ms * 1e-3) / 1e12, "pct_copy": 100 * wb / (ms * 1e-3) / copy_bw,
                     "peak_GiB": torch.cuda.max_memory_allocated() / 2**30, "hf_eager_tok_s": hf_tps,
                     "agree_hf": None if ref_tokens is None else f"{agree(toks, ref_tokens)}/{len(ref_tokens)}"})
        print(rows[-1], flush=True)
        try:
            breakdowns.append(f"# {name}: device time per token by kernel\n" + kernel_breakdown(dec, prompt))
            print(breakdowns[-1], flush=True)
        except Exception as e:  # the profiler is a diagnostic; the timings above stand without it
            print(f"profiler failed: {e}", flush=True)

    with torch.inference_mode():
        hf16_tps, hf16 = hf_generate(model, prompt, args.hf_tokens)
        print(f"transformers eager fp16: {hf16_tps:.1f} tok/s", flush=True)
        dec = Decoder(model, max_len)
        measure("fp16 (cuBLAS)", dec, hf16, hf16_tps)
        del dec
        gc.collect()
        torch.cuda.empty_cache()

        t = time.perf_counter()
        quantize_linears_(model, fmt)
        print(f"RTN W4 g{args.group_size} in memory: {time.perf_counter() - t:.1f} s", flush=True)
        gc.collect()
        torch.cuda.empty_cache()
        hf4_tps, hf4 = hf_generate(model, prompt, args.hf_tokens)
        print(f"transformers eager W4: {hf4_tps:.1f} tok/s", flush=True)
        dec = Decoder(model, max_len)
        tune_s = []

        def tune() -> None:
            if args.tune:
                t = time.perf_counter()
                dec.tune()
                tune_s.append(time.perf_counter() - t)

        tune()
        measure(f"lowbit W4 g{args.group_size} (lm_head fp16)", dec, hf4, hf4_tps)
        dec.lm_head = QuantLinear.from_linear(model.lm_head, fmt)
        dec.graph = None
        tune()
        measure(f"lowbit W4 g{args.group_size} + W4 lm_head", dec, None, None)

    base = rows[0]["tok_s"]
    for r in rows:
        r["speedup"] = r["tok_s"] / base
    head = [f"# command: python {' '.join(sys.argv)}",
            f"# GPU: {props.name}; torch {torch.__version__}, triton {triton.__version__}; "
            f"copy bandwidth {copy_bw / 1e12:.2f} TB/s (read + write)",
            f"# model: random-weight Llama-3-8B shape, {args.layers} layers, fp16 activations; batch 1, "
            f"prompt {args.prompt_tokens} tokens, {args.new_tokens} greedy tokens timed (median of 3)",
            "# path: lowbit.runtime.Decoder = static KV cache + fused step + CUDA graph per token, same for fp16 and W4"
            + (f"; W4 kernel configs chosen by Decoder.tune() in the captured step ({', '.join(f'{t:.0f}' for t in tune_s)} s)"
               if tune_s else "; W4 kernel configs timed per kernel (select_config)"),
            "# weights_GB = bytes read per token; bw = weights_GB / time; peak = torch max_memory_allocated in the "
            "timed run (includes the transformers model the decoder was built from)",
            "# hf_eager = transformers generate() with DynamicCache, "
            f"{args.hf_tokens} tokens (prompt pass included); agree_hf = greedy tokens equal to it (prefix)"]
    cols = [("variant", "{}"), ("tok_s", "{:.1f}"), ("ms_token", "{:.2f}"), ("speedup", "{:.2f}x"),
            ("weights_GB", "{:.2f}"), ("bw_TBs", "{:.2f}"), ("pct_copy", "{:.0f}%"), ("peak_GiB", "{:.1f}"),
            ("hf_eager_tok_s", "{:.1f}"), ("agree_hf", "{}")]
    text = "\n".join(head) + "\n" + table(rows, cols) + "\n\n" + "\n".join(breakdowns) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"decode_{args.tag}.txt").write_text(text)


if __name__ == "__main__":
    main()
