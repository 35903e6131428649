"""bitsandbytes NF4 (what `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")` stores:
blocks of 64 along the flattened weight, float32 absmax per block, no double quantization by default),
through bitsandbytes' own quantize_4bit / dequantize_4bit on every decoder linear.

    PEER_PYTHON bench/peers/bnb_run.py --model M --calib ids.pt --out O [--double-quant 1]   (--calib unused)
"""
from __future__ import annotations

import torch

from _peer import Timer, package_version, parse_args, save_dequantized


def main() -> None:
    args = parse_args(**{"--double-quant": 0})
    import bitsandbytes.functional as F
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    W_r = {}
    with Timer() as t, torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and name != "lm_head":
                q, state = F.quantize_4bit(m.weight.data, blocksize=args.group_size, quant_type="nf4",
                                           compress_statistics=bool(args.double_quant))
                W_r[name + ".weight"] = F.dequantize_4bit(q, state).float().reshape(m.weight.shape)
    save_dequantized(args.model, args.out, W_r,
                     {"peer": "bitsandbytes", "version": package_version("bitsandbytes"), "quant_type": "nf4",
                      "blocksize": args.group_size, "double_quant": bool(args.double_quant),
                      "quantize_s": t.s, "n_quantized": len(W_r)})


if __name__ == "__main__":
    main()
