"""bench/awq.py — lowbit's AWQ family beside llm-compressor's AWQ and auto-round (issue 9).

Same calibration ids for every row (lowbit's default SOTU text, --n-calib × 512, seed 0; the peers
read them from a file), each quantizer in its own process (peers in their own venvs, see
bench/peers/setup.sh), all outputs scored in one `lowbit eval` on held-out Moby Dick.

    PYTHONPATH=bench python bench/awq.py [--models smollm2-135m:64 qwen2.5-0.5b:128] [--entries ...]
        [--n-calib 128] [--keep DIR [--reuse]]
"""
from __future__ import annotations

from common import quality_main

ENTRIES = ["rtn", "awq", "dh-awq", "awq-joint", "llmc-awq", "auto-round"]

if __name__ == "__main__":
    quality_main(ENTRIES)
