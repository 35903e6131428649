#!/usr/bin/env bash
# Create .venv (Python 3.10+) and install lowbit with the given extras. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# A CPU wheel of torch 2.13.0 where the machine provides one; any torch already installed is kept.
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".${1:+[$1]}"
