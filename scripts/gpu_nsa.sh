#!/usr/bin/env bash
# One GPU session for attn/nsa: environment, GPU tests (kernels and end to end), benchmark;
# everything under $OUT.   STAGES="env tests bench parts" BENCH_ARGS="..." scripts/gpu_nsa.sh
# (parts: per-stage times of our layer, scripts/bench_nsa.py --parts)
# Carry [".whl"] (fla-core wheel for the fla_nsa baseline).
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
STAGES=${STAGES:-"env tests bench"}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
if ls .whl/fla_core*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/fla_core*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
for s in $STAGES; do
  case $s in
    env)
      bash scripts/gpu_env.sh 2>&1 | tee "$OUT/env.txt" ;;
    tests)
      timeout ${TEST_TIMEOUT:-300} python3 -m pytest -m gpu tests/attn/nsa/test_nsa_gpu.py tests/attn/nsa/test_nsa_cmp.py tests/attn/nsa/test_nsa_slc.py -q -rA -s \
        -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.log" | grep -v "^PASSED\|^$" | tail -40 ;;
    bench)
      timeout ${BENCH_TIMEOUT:-400} python3 scripts/bench_nsa.py --out "$OUT" ${BENCH_ARGS:-} \
        2>&1 | tee "$OUT/bench.log" | grep -v "^\s*$" ;;
    parts)
      timeout ${BENCH_TIMEOUT:-400} python3 scripts/bench_nsa.py --parts --out "$OUT" \
        ${PARTS_ARGS:---seqlens 65536 --heads 64 --kv-heads 4} 2>&1 | tee "$OUT/parts.log" ;;
    *)
      eval "$s" ;;
  esac
done
