#!/usr/bin/env bash
# One GPU session for attn/flash: environment, GPU tests, benchmark; everything under $OUT.
#   STAGES="env tests bench" BENCH_ARGS="--backends flash,flex" scripts/gpu_flash.sh
# Carry [".whl"] (fla-core wheel) and optionally [".cache"] (compiled-kernel caches a previous
# run left in $OUT/cache.tgz, unpacked here) to save compile time.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
STAGES=${STAGES:-"env tests bench"}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
export TRITON_CACHE_DIR=$PWD/.cache/triton TORCHINDUCTOR_CACHE_DIR=$PWD/.cache/inductor
for s in $STAGES; do
  case $s in
    env)
      bash scripts/gpu_env.sh 2>&1 | tee "$OUT/env.txt" ;;
    tests)
      FLASH_AUTOTUNE=0 timeout ${TEST_TIMEOUT:-300} python3 -m pytest -m gpu tests/attn/flash \
        -q -rA -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.log" | grep -v "^PASSED\|^$" ;;
    cputests)  # the CPU/interpreter suite's non-interpreter parts on CUDA tensors
      FLASH_AUTOTUNE=0 timeout 300 python3 -m pytest tests/attn/flash/test_flash.py -q -x \
        -p no:cacheprovider 2>&1 | tail -5 | tee "$OUT/pytest_cuda_small.log" ;;
    bench)
      timeout ${BENCH_TIMEOUT:-400} python3 scripts/bench_attn.py --out "$OUT" ${BENCH_ARGS:-} \
        2>&1 | tee "$OUT/bench.log" | grep -v "^\s*$" ;;
    *)
      eval "$s" ;;
  esac
done
if [ -d .cache ]; then tar czf "$OUT/cache.tgz" .cache 2>/dev/null; ls -la "$OUT/cache.tgz"; fi
