#!/usr/bin/env bash
# End-to-end training on one GPU (the device machine), one call: GPU correctness of the compiled
# model and the new paths, then profiles and the train.py-vs-HF throughput sweep.
#   STAGES="check profile bench" BENCH_ARGS="--seqlens 8k,32k ..." bash scripts/gpu_e2e.sh
# carry: .whl (../shared/device/wheels.sh .whl). Results under $OUT: gpu_tests.log,
# profile_<run>.json/.txt, bench_train.{json,md,png}.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
export LONGCTX_CACHE=/tmp/longctx-cache PYTHONUNBUFFERED=1 FLASH_AUTOTUNE=0 LINEAR_AUTOTUNE=0
STAGES=${STAGES:-check profile bench}
nvidia-smi --query-gpu=name,clocks.sm,power.draw,power.limit,memory.used --format=csv,noheader

for stage in $STAGES; do
  case $stage in
  check)  # compiled == eager per family on CUDA; FlexAttention documents; 64-bit offsets
    timeout ${CHECK_TIMEOUT:-240} python3 -m pytest -q -m gpu -x -p no:cacheprovider \
      ${CHECK_TESTS:-tests/parallel/test_compile.py tests/attn/test_sdpa.py} 2>&1 \
      | tee "$OUT/gpu_tests.log" | tail -15 ;;
  profile)  # device time per kind of kernel, 350m at 8k, eager vs compiled
    for c in ${PROFILE_COMPILE:-false true}; do
      run=prof-${PROFILE_ATTN:-flash}-c$c
      timeout ${PROFILE_TIMEOUT:-150} python3 train.py model=350m attn=${PROFILE_ATTN:-flash} \
        logger=jsonl trainer.progress=false trainer.seq_len=${PROFILE_T:-8192} \
        trainer.global_batch=$((32768 / ${PROFILE_T:-8192})) trainer.micro_batch=$((32768 / ${PROFILE_T:-8192})) \
        trainer.steps=6 trainer.log_every=1 trainer.val_every=0 trainer.ckpt_every=0 \
        trainer.compile=$c trainer.profile_steps=3 data.document_mask=false \
        run_name=$run hydra.run.dir=/tmp/runs/$run 2>&1 | grep -E "step=|error|Error" | tail -3
      cp /tmp/runs/$run/profile.json "$OUT/profile_$run.json" 2>/dev/null
      head -45 /tmp/runs/$run/profile.txt > "$OUT/profile_$run.txt" 2>/dev/null
      python3 -c "import json,sys; d=json.load(open(sys.argv[1]))['share']; print(sys.argv[2], {k: round(v, 3) for k, v in sorted(d.items(), key=lambda x: -x[1])})" \
        /tmp/runs/$run/profile.json $run 2>/dev/null
    done ;;
  bench)
    python3 scripts/bench_train.py --out "$OUT" ${BENCH_ARGS:-} ;;
  *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
