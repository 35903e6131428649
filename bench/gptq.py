"""bench/gptq.py — lowbit's GPTQ variants beside GPTQModel's and llm-compressor's GPTQ (issue 4).

Same calibration ids for every row (lowbit's default SOTU text, --n-calib × 512, seed 0; the peers
read them from a file), each quantizer in its own process (peers in their own venvs, see
bench/peers/setup.sh), all outputs scored in one `lowbit eval` on held-out Moby Dick.

    PYTHONPATH=bench python bench/gptq.py [--models smollm2-135m:64 qwen2.5-0.5b:128] [--entries ...]
        [--n-calib 128] [--keep DIR [--reuse]]
"""
from __future__ import annotations

from common import quality_main

# lowbit's gptq orders columns by descending diag H by default (static groups); "--no-act-order" is the
# plain column order the issue calls "gptq".
ENTRIES = ["rtn", "gptq --no-act-order", "gptq", "awq+gptq", "gptqmodel", "llmc-gptq"]

if __name__ == "__main__":
    quality_main(ENTRIES)
