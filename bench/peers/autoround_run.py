"""auto-round (SignRound) W{bits} g{group} on lowbit's calibration ids, default 200 iterations.

    PEER_PYTHON bench/peers/autoround_run.py --model M --calib ids.pt --out O [--iters 200]
"""
from __future__ import annotations

import torch

from _peer import Timer, calibration_ids, package_version, parse_args, save_dequantized


def main() -> None:
    args = parse_args(**{"--iters": 200, "--batch-size": 8})
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = calibration_ids(args.calib)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    batches = list(ids.split(args.batch_size))
    with Timer() as t:
        ar = AutoRound(model, tok, bits=args.bits, group_size=args.group_size, sym=args.sym, dataset=batches,
                       nsamples=len(ids), seqlen=ids.shape[1], batch_size=args.batch_size, iters=args.iters)
        qmodel, _ = ar.quantize()
    # The tuned weights, as its fake-quant format would hold them, read from memory: its saver
    # (0.16.1) copies every float32 tensor of the source checkpoint back over the saved ones
    # ("restore FP32 tensors from source"), which for lowbit's float32 base undoes the quantization.
    W_r = {f"{n}.weight": m.weight.detach().float().cpu().clone() for n, m in qmodel.named_modules()
           if isinstance(m, torch.nn.Linear) and getattr(m, "scale", None) is not None}
    save_dequantized(args.model, args.out, W_r,
                     {"peer": "auto-round", "version": package_version("auto-round"), "iters": args.iters,
                      "batch_size": args.batch_size, "quantize_s": t.s, "n_quantized": len(W_r)})


if __name__ == "__main__":
    main()
