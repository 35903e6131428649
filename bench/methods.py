"""bench/methods.py — every lowbit method side by side on one real model (KLD also as a ratio to RTN).

Same calibration ids for every row (lowbit's default SOTU text, --n-calib × 512, seed 0; the peers
read them from a file), each quantizer in its own process (peers in their own venvs, see
bench/peers/setup.sh), all outputs scored in one `lowbit eval` on held-out Moby Dick.

    PYTHONPATH=bench python bench/methods.py [--models smollm2-135m:64 qwen2.5-0.5b:128] [--entries ...]
        [--n-calib 128] [--keep DIR [--reuse]]
"""
from __future__ import annotations

from common import quality_main

ENTRIES = ["rtn", "awq", "dh-awq", "awq-joint", "gptq", "awq+gptq"]

if __name__ == "__main__":
    quality_main(ENTRIES)
