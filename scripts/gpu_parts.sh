#!/usr/bin/env bash
# One GPU session of per-stage profiles: MoBA stages (+ launch-config sweep at 64k) and the linear
# scan's passes, and the GPU tests of both families; everything under $OUT.
#   STAGES="env tests moba sweep linear" scripts/gpu_parts.sh
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
STAGES=${STAGES:-"env moba sweep linear"}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
for s in $STAGES; do
  case $s in
    env)
      bash scripts/gpu_env.sh 2>&1 | tee "$OUT/env.txt" ;;
    tests)
      timeout ${TEST_TIMEOUT:-240} python3 -m pytest -m gpu tests/attn/moba -q -p no:cacheprovider \
        > "$OUT/pytest_moba_gpu.log" 2>&1; tail -2 "$OUT/pytest_moba_gpu.log"
      LINEAR_AUTOTUNE=0 timeout ${TEST_TIMEOUT:-240} python3 -m pytest -m gpu tests/attn/linear \
        tests/attn/lightning -q -p no:cacheprovider > "$OUT/pytest_linear_gpu.log" 2>&1
      tail -2 "$OUT/pytest_linear_gpu.log" ;;
    moba)
      timeout ${MOBA_TIMEOUT:-200} python3 scripts/moba_parts.py --out "$OUT/moba" \
        --seqlens ${MOBA_SEQLENS:-8192,16384,65536} > "$OUT/moba_parts.log" 2>&1
      tail -5 "$OUT/moba_parts.log" ;;
    sweep)
      timeout ${SWEEP_TIMEOUT:-300} python3 scripts/moba_parts.py --out "$OUT/moba_sweep" \
        --seqlens 65536 --sweep > "$OUT/moba_sweep.log" 2>&1
      tail -3 "$OUT/moba_sweep.log" ;;
    linear)
      timeout ${LINEAR_TIMEOUT:-150} python3 scripts/linear_parts.py --out "$OUT/linear" \
        > "$OUT/linear_parts.log" 2>&1
      timeout ${LINEAR_TIMEOUT:-150} python3 scripts/linear_parts.py --decay --out "$OUT/linear" \
        >> "$OUT/linear_parts.log" 2>&1
      tail -8 "$OUT/linear_parts.log" ;;
    *)
      eval "$s" ;;
  esac
done
