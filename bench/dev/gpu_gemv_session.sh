#!/bin/bash
# One device call: the GEMV path's checks, the kernel table and the decode measurement, all with LOWBIT_W4_GEMV=1.
# usage (device machine): bash bench/dev/gpu_gemv_session.sh STEP...   (steps: check tests sweep quick kernel decode)
[ -d /tmp/site/transformers ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD:$PWD/bench LOWBIT_W4_GEMV=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
git log --oneline -1 2>/dev/null
for step in "$@"; do
  echo "== $step $(date +%T)"
  case $step in
    check) timeout 150 python3 bench/dev/gemv_check.py 2>&1 | tail -12 ;;
    tests) timeout 240 python3 -m pytest -q -p no:cacheprovider -x tests/test_kernels.py -k "not test_load_gives_fake_quant_logits" 2>&1 | tail -8 ;;
    kernel) (cd bench && timeout 300 python3 kernel.py --out $OUT/kernel 2>&1 | grep -vi warn | tail -30) ;;
    sweep) timeout 300 python3 bench/dev/kernel_sweep.py --gemv --shape 8192x8192 --batch 1 --bn 16,32,64,128 \
             --splits 1,2,4,8 --warps 2,4 --stages 3,4,6 --atomic 0 --triggers 0 --top 25 2>&1 | grep -vi warn | tail -30 ;;
    quick) (cd bench && timeout 200 python3 kernel.py --shapes 8192x8192,28672x8192 --batches 1,16 --no-save 2>&1 | grep -vi warn | tail -8) ;;
    decode) timeout 420 python3 bench/decode.py --out $OUT/dec --hf-tokens 4 --tune 2>&1 | tail -25 ;;
  esac
done
echo "== end $(date +%T)"
