#!/bin/bash
# Compile llama.cpp's ggml-quants.c alone (Release flags, no FMA contraction) with harness.c and
# quantize every input written by `golden.py inputs`. Usage: run.sh GGML_DIR WORK_DIR
#   GGML_DIR: the ggml/ folder of llama.cpp (llama-cpp-python 0.3.36 sdist: vendor/llama.cpp/ggml)
set -e
GGML=$1; WORK=$2; HERE=$(cd "$(dirname "$0")" && pwd)
CFLAGS="-O3 -DNDEBUG -ffp-contract=off -std=gnu11 -I$GGML/include -I$GGML/src -I$GGML/src/ggml-cpu"
gcc $CFLAGS -c "$GGML/src/ggml-quants.c" -o "$WORK/quants.o"
gcc $CFLAGS "$HERE/harness.c" "$HERE/stubs.c" "$WORK/quants.o" -lm -o "$WORK/harness"
for case in "$WORK"/in/*.shape; do
  b=$(basename "$case" .shape); read rows cols < "$case"
  for t in q4_0 q4_1 q5_0 q5_1 q8_0 q2_k q3_k q4_k q5_k q6_k; do
    "$WORK/harness" $t $rows $cols "$WORK/in/$b.f32" "$WORK/out/$b.$t.bin"
    "$WORK/harness" $t $rows $cols "$WORK/in/$b.f32" "$WORK/out/$b.$t.imatrix.bin" "$WORK/in/$b.imatrix.f32"
  done
done
