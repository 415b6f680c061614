#!/usr/bin/env bash
# One GPU session for attn/linear + attn/lightning: environment, GPU tests, benchmark vs fla.
# Everything lands under $OUT:
#   env.txt, pytest_gpu.log (pytest -m gpu on tests/attn/linear and tests/attn/lightning),
#   bench_linear.{json,md} + bench.log (scripts/bench_linear.py), cache.tgz (Triton cache).
# Usage (repository root):   OUT=/some/dir scripts/gpu_lightning.sh
#   STAGES="env tests bench"   subset / order of stages (default: all three)
#   BENCH_ARGS="--seqlens 4096,16384,65536"   extra arguments of bench_linear.py
# Carry [".whl"] (../shared/device/wheels.sh .whl fla-core==0.6.0) for the fla columns, and
# optionally [".cache"] (a previous run's $OUT/cache.tgz unpacked) to skip kernel compilation.
# Expected wall time on an H100: tests ~4 min (about 100 kernel compilations: every autotune
# candidate is also run on its own), bench ~4 min (autotuning + 6 sequence lengths x 4 backends).
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
STAGES=${STAGES:-"env tests bench"}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site_lin .whl/*.whl && export PYTHONPATH=/tmp/site_lin:$PWD
fi
export TRITON_CACHE_DIR=$PWD/.cache/triton
rc=0
for s in $STAGES; do
  case $s in
    env)
      bash scripts/gpu_env.sh --fla 2>&1 | tee "$OUT/env.txt" ;;
    tests)
      # the default kernel config only (autotuning every test shape would compile for minutes);
      # test_gpu_every_config runs each autotune candidate on its own
      LINEAR_AUTOTUNE=0 timeout ${TEST_TIMEOUT:-900} python3 -m pytest -m gpu \
        tests/attn/linear tests/attn/lightning -q -rA -p no:cacheprovider \
        2>&1 | tee "$OUT/pytest_gpu.log" | grep -v "^PASSED\|^$"
      [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1 ;;
    bench)
      timeout ${BENCH_TIMEOUT:-900} python3 scripts/bench_linear.py --out "$OUT" ${BENCH_ARGS:-} \
        2>&1 | tee "$OUT/bench.log" | grep -v "^\s*$"
      [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1 ;;
    *)
      eval "$s" ;;
  esac
done
if [ -d .cache ]; then tar czf "$OUT/cache.tgz" .cache 2>/dev/null; ls -la "$OUT/cache.tgz"; fi
exit $rc
