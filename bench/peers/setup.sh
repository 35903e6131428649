#!/usr/bin/env bash
# Peer tools, each in its own venv under ~/.cache/lowbit/peers (they pin different transformers/torch).
#   bash bench/peers/setup.sh [llmc] [autoround] [gptqmodel] [hqq] [bnb]      (default: all)
set -euo pipefail
ROOT="${LOWBIT_CACHE:-$HOME/.cache/lowbit}/peers"
PY="${PYTHON:-python3.11}"
mkdir -p "$ROOT"
want() { local name=$1; shift; [ $# -eq 0 ] || [[ " $* " == *" $name "* ]]; }  # want NAME [ASKED...]
mk() {  # mk NAME TORCH PACKAGES...
  local name=$1 torch=$2; shift 2
  [ -x "$ROOT/$name/bin/python" ] && "$ROOT/$name/bin/python" -c "import sys" && [ -f "$ROOT/$name/.ok" ] && return
  "$PY" -m venv "$ROOT/$name"
  "$ROOT/$name/bin/pip" install -q "torch==$torch" setuptools wheel
  "$ROOT/$name/bin/pip" install -q "$@"
  touch "$ROOT/$name/.ok"
}
ARGS=("$@")
want llmc "${ARGS[@]}" && mk llmc 2.13.0 llmcompressor==0.14.0.1
want autoround "${ARGS[@]}" && mk autoround 2.13.0 auto-round==0.16.1
# GPTQModel 7.7.0 needs torch 2.14.1 and builds without isolation against it.
want gptqmodel "${ARGS[@]}" && mk gptqmodel 2.14.1 --no-build-isolation gptqmodel==7.7.0
want hqq "${ARGS[@]}" && DISABLE_CUDA=1 mk hqq 2.13.0 hqq==0.2.8.post1 transformers
want bnb "${ARGS[@]}" && mk bnb 2.13.0 bitsandbytes transformers accelerate
echo "peers ready under $ROOT"
