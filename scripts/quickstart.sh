#!/usr/bin/env bash
# Set up, then the main job end to end on the real SmolLM2-135M:
# fetch -> quantize (RTN, INT4, group 64, compressed-tensors) -> evaluate against the base on held-out text.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
MODEL=$(.venv/bin/lowbit -q fetch smollm2-135m)
OUT=${OUT:-$HOME/.cache/lowbit/runs/smollm2-135m-rtn-w4g64}
.venv/bin/lowbit quantize --model-path "$MODEL" --output-dir "$OUT" --method rtn --bits 4 --group-size 64 --overwrite
.venv/bin/lowbit -q eval --model-path "$OUT" --base "$MODEL" --text moby-dick --ctx 512 --n-windows 40 --no-cache
