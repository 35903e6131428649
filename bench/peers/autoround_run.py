"""auto-round (SignRound) W{bits} g{group} on lowbit's calibration ids, default 200 iterations.

    PEER_PYTHON bench/peers/autoround_run.py --model M --calib ids.pt --out O [--iters 200]
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from _peer import Timer, calibration_ids, package_version, parse_args, save_dequantized


def main() -> None:
    args = parse_args(**{"--iters": 200, "--batch-size": 8})
    from auto_round import AutoRound
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = calibration_ids(args.calib)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    batches = list(ids.split(args.batch_size))
    with Timer() as t:
        ar = AutoRound(model, tok, bits=args.bits, group_size=args.group_size, sym=args.sym, dataset=batches,
                       nsamples=len(ids), seqlen=ids.shape[1], batch_size=args.batch_size, iters=args.iters)
        with tempfile.TemporaryDirectory() as tmp:
            ar.quantize_and_save(tmp, format="fake")
            W_r = {}
            for f in Path(tmp).rglob("*.safetensors"):
                W_r.update({k: v for k, v in load_file(f).items() if k.endswith("proj.weight")})
    save_dequantized(args.model, args.out, W_r,
                     {"peer": "auto-round", "version": package_version("auto-round"), "iters": args.iters,
                      "batch_size": args.batch_size, "quantize_s": t.s, "n_quantized": len(W_r)})


if __name__ == "__main__":
    main()
