"""Decode-step variants on one random 8B-shaped model, interleaved: ms/token each (median of 3 x 128 tokens).

The table of 2026-12-07 in bench/results/decode_h100.txt came from this script with two more knobs, the
"pf" rows (an L2 prefetch the W4 kernel no longer has: it lost everywhere)."""
import gc, sys, time, json, os
import torch
sys.path.insert(0, "bench")
from decode import llama3_8b_config, time_decoder
from transformers import AutoModelForCausalLM
from lowbit.formats.int import IntFormat
from lowbit.kernels import QuantLinear, decode_ops, triton_w4a16 as tw
from lowbit.runtime import Decoder, quantize_linears_

N_TOK = 128
out = os.environ.get("OUT", "/tmp")
torch.manual_seed(0)
with torch.device("cuda"):
    model = AutoModelForCausalLM.from_config(llama3_8b_config(32), dtype=torch.float16).eval()
prompt = torch.randint(0, 128000, (1, 16), device="cuda")
max_len = 16 + N_TOK + 8
torch_next = lambda logits, tok, tokens, pos: (tokens.index_copy_(0, pos + 1, logits.argmax(-1)),
                                               tok.copy_(logits.argmax(-1)), pos.add_(1))
triton_next = decode_ops.next_token_
res = {}

def ms(dec):
    tps, toks = time_decoder(dec, prompt, N_TOK)
    return 1e3 / tps, toks

def variant(name, dec, trig=False, argmax="triton"):
    tw.TRIGGER = trig
    decode_ops.next_token_ = triton_next if argmax == "triton" else torch_next
    dec.graph = None
    t, toks = ms(dec)
    res.setdefault(name, []).append(t)
    print(f"{name:40s} {t:.3f} ms/token  tokens[:8]={toks[:8].tolist()}", flush=True)
    return toks

with torch.inference_mode():
    dec = Decoder(model, max_len)
    for _ in range(2):
        a = variant("fp16 torch-argmax", dec, argmax="torch")
        b = variant("fp16 triton-argmax", dec)
    assert torch.equal(a, b), "argmax variants disagree"
    del dec; gc.collect(); torch.cuda.empty_cache()
    fmt = IntFormat(4, 128, sym=False, scale_dtype=torch.float16)
    quantize_linears_(model, fmt)
    gc.collect(); torch.cuda.empty_cache()
    dec = Decoder(model, max_len)
    dec.lm_head = QuantLinear.from_linear(model.lm_head, fmt)
    VARS = [("w4 base torch-argmax", dict(argmax="torch")), ("w4 base", {}), ("w4 trig", dict(trig=True))]
    ref = None
    for rep in range(2):
        for name, kw in VARS:
            toks = variant(name, dec, **kw)
            if ref is None:
                ref = toks
            elif not torch.equal(toks, ref):
                print(f"  !! {name} tokens differ", flush=True)
    # in-graph tuning (Decoder.tune): coordinate descent over the W4 shapes inside the captured step
    tw.TRIGGER = False
    decode_ops.next_token_ = triton_next
    iso = dict(tw._TUNED)
    t0 = time.time()
    chosen = dec.tune()
    print(f"tune: {time.time() - t0:.0f} s", flush=True)
    for k, c in chosen.items():
        print(f"in-graph N={k[1]} K={k[2]} pro={k[7]}: isolated {iso.get(k)} -> {c}", flush=True)
    ingraph = dict(tw._TUNED)
    for rep in range(2):
        tw._TUNED.update(iso)
        variant("w4 isolated-tuned", dec)
        tw._TUNED.update(ingraph)
        variant("w4 ingraph-tuned", dec)
        variant("w4 ingraph-tuned trig", dec, trig=True)
    print(json.dumps({k: sorted(v) for k, v in res.items()}, indent=1))
    best = min(["w4 ingraph-tuned", "w4 ingraph-tuned trig"], key=lambda k: min(res[k]))
    open(os.path.join(out, "best.env"), "w").write(f"export LOWBIT_W4_TRIGGER={int('trig' in best)}\n")
    print("best:", best, flush=True)
