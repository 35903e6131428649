"""HQQ (half-quadratic quantization: calibration-free, each group's zero and scale optimised by
HQQ's own solver) W{bits} g{group}, through HQQ's Quantizer on every decoder linear.

    PEER_PYTHON bench/peers/hqq_run.py --model M --calib ids.pt --out O     (--calib is not used)
"""
from __future__ import annotations

import torch

from _peer import Timer, package_version, parse_args, save_dequantized


def main() -> None:
    args = parse_args()
    from hqq.core.quantize import Quantizer
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    W_r = {}
    with Timer() as t, torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and name != "lm_head":
                # HQQ's BaseQuantizeConfig defaults: axis=1 (groups along the input dimension),
                # optimize=True, zero and scale kept in 16 bits (not re-quantized)
                W_q, meta = Quantizer.quantize(m.weight.data, nbits=args.bits, channel_wise=True,
                                               group_size=args.group_size, optimize=True, round_zero=False,
                                               axis=1, bitpack=False, compute_dtype=torch.float32, device="cpu")
                W_r[name + ".weight"] = Quantizer.dequantize(W_q, meta).reshape(m.weight.shape)
    save_dequantized(args.model, args.out, W_r,
                     {"peer": "hqq", "version": package_version("hqq"), "axis": 1, "optimize": True,
                      "quantize_s": t.s, "n_quantized": len(W_r)})


if __name__ == "__main__":
    main()
