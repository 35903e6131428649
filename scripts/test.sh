#!/usr/bin/env bash
# Set up with test dependencies, fetch the real SmolLM2 for the integration tests, run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
.venv/bin/lowbit -q fetch smollm2-135m >/dev/null
# llama.cpp's tools for the GGUF runtime test (built once, cached in ~/.cache/lowbit/llama.cpp).
.venv/bin/python -m lowbit.tools.llamacpp >/dev/null || echo "llama.cpp could not be built; its test will skip" >&2
# pytest exits 5 when it ran nothing; any non-zero status fails this script.
LOWBIT_REQUIRE_REAL=1 .venv/bin/python -m pytest -q -p no:cacheprovider tests "$@"
