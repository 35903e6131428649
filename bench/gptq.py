"""bench/gptq.py — lowbit's GPTQ variants beside GPTQModel's and llm-compressor's GPTQ (issue 4).

Same calibration ids for every row (lowbit's default SOTU text, --n-calib × 512, seed 0; the peers
read them from a file), each quantizer in its own process (peers in their own venvs, see
bench/peers/setup.sh), all outputs scored in one `lowbit eval` on held-out Moby Dick.

    PYTHONPATH=bench python bench/gptq.py --model smollm2-135m --group-size 64 [--keep DIR [--reuse]]
    PYTHONPATH=bench python bench/gptq.py --model qwen2.5-0.5b --group-size 128
"""
from __future__ import annotations

import argparse
from pathlib import Path

from common import quality_table

ENTRIES = ["rtn", "gptq", "gptq --act-order", "awq+gptq", "gptqmodel", "llmc-gptq"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--entries", nargs="+", default=ENTRIES, help="lowbit methods (with flags) or peer names")
    ap.add_argument("--n-calib", type=int, default=128)
    ap.add_argument("--n-windows", type=int, default=40)
    ap.add_argument("--keep", type=Path, default=None, help="keep the outputs here")
    ap.add_argument("--reuse", action="store_true", help="with --keep: score outputs already there again")
    args = ap.parse_args()
    print(quality_table(args.model, args.group_size, args.entries, args.n_calib, args.n_windows, args.keep, args.reuse))


if __name__ == "__main__":
    main()
