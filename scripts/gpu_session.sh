#!/usr/bin/env bash
# One GPU session (the device machine): set up the environment once, then run the parts named
# on the command line in that order; every result lands under $OUT (default ./gpu_out).
#
#   bash scripts/gpu_session.sh PART ["PART ARGS..."] ...
#   bash scripts/gpu_session.sh env tests train flash nsa lightning moba
#   bash scripts/gpu_session.sh env tests "nsa --seqlens 65536 --heads 64 --kv-heads 4" nsa-parts
#
# A quoted word is a part followed by extra arguments for its script (they come after the
# defaults below, so a repeated flag overrides them). Parts:
#   env           card, driver, clock, power limit; torch, triton, fla, transformers versions
#   tests         pytest -m gpu for the families of the other parts named in this call (all GPU
#                 tests when none is), kernel autotuning off      -> $OUT/tests/pytest_gpu.log
#   flash         scripts/bench/bench_attn.py (every attention backend)    -> $OUT/flash/
#   nsa-cmp       A/B of NSA's compressed-branch kernels: NSA_CMP_IMPL=triton against =gluon
#                 (ab_kernels.py, the whole NSA layer at 16k and 64k, 64 / 4 heads, forward and
#                 forward + backward, 3 alternating rounds each)              -> $OUT/nsa-cmp/
#   moba-gluon    A/B of MoBA's dK/dV kernels, MOBA_DKDV_IMPL=triton against =gluon (ab_kernels.py,
#                 forward + backward, moba (16k, GQA 16/4) and moba64k (64k, 16/16), 3 alternating
#                 rounds)                                                    -> $OUT/moba-gluon/
#   moba-routed   A/B of MoBA's routed forward, MOBA_ROUTED_IMPL=triton against =gluon, and of its
#                 routed dQ, MOBA_ROUTED_DQ_IMPL (as moba-gluon)     -> $OUT/moba-routed/, -dq/
#   moba-tile     A/B of MoBA's tile kernels, the Triton one against the persistent Gluon ones:
#                 MOBA_TILE_IMPL (forward only), then MOBA_TILE_DQ_IMPL (forward + backward)
#                 (as moba-gluon)                            -> $OUT/moba-tile/, $OUT/moba-tile-dq/
#   moba-heads    A/B of MoBA's head pieces under GQA, MOBA_HEAD_CHUNKS=1 (one call over all heads)
#                 against =4 (one KV head per piece, auto's choice from 64k; attn/moba/heads.py),
#                 forward + backward, moba (16k) and moba64k_gqa (64k), both 16 / 4 heads (as
#                 moba-gluon)                                            -> $OUT/moba-heads/
#   moba-ncu      Nsight Compute on MoBA's dK/dV kernel at 64k (16 / 16 heads), the Triton one and
#                 the Gluon one (MOBA_DKDV_IMPL): speed of light, memory, warp states, occupancy
#                 (tune_moba.py --once; --clock-control none)     -> $OUT/moba-ncu/{triton,gluon}.txt
#                 MOBA_NCU_KERNEL: another kernel's name regex (e.g. _topk_kernel), MOBA_NCU_IMPLS:
#                 the MOBA_DKDV_IMPL values to profile (default "triton gluon")
#   ahead         A/B of the Triton flash forward with FLASH_FWD_AHEAD=1 against =0
#                 (ab_kernels.py, forward only, D 128 and D 64, 5 alternating rounds) -> $OUT/ahead/
#   gluon         flash (the Gluon forward and dK/dV on Hopper), with the Triton dK/dV kernel
#                 (FLASH_DKDV_IMPL=triton) and with the Triton kernels only, against cuDNN, Flex
#                 and fla: bench_attn.py at 4k / 16k / 64k, D 128, then D 64 at 8k / 16k
#                                                                         -> $OUT/gluon/, gluon64/
#   lightning     scripts/bench/bench_linear.py (linear, lightning vs fla) -> $OUT/lightning/
#   moba          scripts/bench/bench_moba.py                              -> $OUT/moba/
#   nsa           scripts/bench/bench_nsa.py                               -> $OUT/nsa/
#   nsa-parts     bench_nsa.py --parts --seqlens 65536 --heads 64 --kv-heads 4
#   moba-parts    scripts/tune/tune_moba.py --seqlens 8192,16384,65536 (stage times)
#   moba-sweep    tune_moba.py --seqlens 65536 --sweep (launch configs)
#   linear-parts  scripts/tune/tune_linear.py, then with --decay (lightning)
#   train         train.py smoke + throughput: bench_train.py on the 125m model at 8k, families
#                 sdpa, flash, lightning, documents masked, autotuned, no HF anchor
#   e2e           bench_train.py with its defaults (350m against the HF Llama anchor)
#   profile       train.py profiles of the 350m model, eager and compiled
#                 (PROFILE_ATTN=flash PROFILE_T=8192 PROFILE_COMPILE="false true")
#   recall        scripts/bench/bench_recall.py: each family trained on data=recall at 8k, then
#                 eval.py's passkey and MQAR grids at 8k and 32k (2-4 min per family at the
#                 defaults, compiled: split the families over calls, e.g. "recall --families
#                 flash,moba --compile")
# Every part writes into $OUT/<part>/ (env only prints).
#   run CMD...    any command in this environment (e.g. "run python3 scripts/tune/tune_flash.py")
# Each part's output also goes to $OUT/<part>.log; a part that fails leaves the others running
# and makes the script exit 1.
#
# Environment: wheels carried in .whl/ (../shared/device/wheels.sh .whl [fla-core==0.6.0]:
# hydra and friends for train.py, fla for the fla baselines) are installed into /tmp/site and
# put on PYTHONPATH; Triton and inductor compile into ./.cache, so a carried .cache (a previous
# session's $OUT/cache.tgz unpacked) skips compilation, and then (or with KEEP_CACHE=1) the
# session's cache is packed into $OUT/cache.tgz again. Per-part time limits: TEST_TIMEOUT
# (default 900 s for all tests), BENCH_TIMEOUT (900 s per part); TEST_K: a pytest -k filter.
set -uo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
[ $# -gt 0 ] || { usage; exit 2; }
case $1 in -h|--help) usage; exit 0;; esac

# the GPU tests of each part's family
LINEAR_TESTS="tests/attn/linear tests/attn/lightning"
TRAIN_TESTS="tests/parallel/test_compile.py tests/attn/test_sdpa.py"
declare -A TESTS=(
  [flash]="tests/attn/flash" [ahead]="tests/attn/flash" [gluon]="tests/attn/flash/test_fwd_gluon.py tests/attn/flash/test_bwd_gluon.py"
  [lightning]=$LINEAR_TESTS [linear-parts]=$LINEAR_TESTS
  [moba]="tests/attn/moba" [moba-parts]="tests/attn/moba" [moba-sweep]="tests/attn/moba"
  [moba-gluon]="tests/attn/moba/test_moba_dkdv_gluon.py"
  [moba-ncu]="tests/attn/moba/test_moba_dkdv_gluon.py"
  [moba-routed]="tests/attn/moba/test_moba_routed_gluon.py"
  [moba-tile]="tests/attn/moba/test_moba_tile_gluon.py"
  [moba-heads]="tests/attn/moba/test_moba_heads.py tests/attn/moba/test_moba_gpu.py"
  [nsa]="tests/attn/nsa" [nsa-parts]="tests/attn/nsa"
  [nsa-cmp]="tests/attn/nsa/test_nsa_cmp_gluon.py tests/attn/nsa/test_nsa_cmp.py tests/attn/nsa/test_nsa_gpu.py"
  [train]=$TRAIN_TESTS [e2e]=$TRAIN_TESTS [profile]=$TRAIN_TESTS [recall]="tests/test_eval.py"
)
PARTS="env tests run $(tr ' ' '\n' <<< "${!TESTS[*]}" | sort | tr '\n' ' ')"
for word in "$@"; do
  read -r part _ <<< "$word"
  case " $PARTS " in
    *" $part "*) ;;
    *) echo "unknown part '$part'; parts: $PARTS" >&2; exit 2 ;;
  esac
done

OUT=$(mkdir -p "${OUT:-gpu_out}" && cd "${OUT:-gpu_out}" && pwd)
export OUT PYTHONUNBUFFERED=1 PYTHONPATH=$PWD LONGCTX_CACHE=${LONGCTX_CACHE:-/tmp/longctx-cache}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
[ -d .cache ] && KEEP_CACHE=${KEEP_CACHE:-1}
export TRITON_CACHE_DIR=$PWD/.cache/triton TORCHINDUCTOR_CACHE_DIR=$PWD/.cache/inductor

bench() {  # bench DIR TIMEOUT SCRIPT ARGS...: one benchmark script, results in $OUT/DIR
  local dir=$OUT/$1 limit=$2; shift 2
  mkdir -p "$dir"; timeout "$limit" python3 "$@" --out "$dir"
}

gpu_tests() {  # the GPU tests of the families named in this call, or all of them
  local paths="" word part
  for word in "$@"; do read -r part _ <<< "$word"; paths+=" ${TESTS[$part]:-}"; done
  paths=$(tr ' ' '\n' <<< "$paths" | awk 'NF && !seen[$0]++' | tr '\n' ' ')
  mkdir -p "$OUT/tests"
  # default kernel configs: autotuning every test shape would compile for many minutes
  FLASH_AUTOTUNE=0 LINEAR_AUTOTUNE=0 timeout "${TEST_TIMEOUT:-900}" python3 -m pytest -m gpu \
    -q -rfE -p no:cacheprovider ${TEST_K:+-k "$TEST_K"} ${paths:-tests} \
    > "$OUT/tests/pytest_gpu.log" 2>&1
  local rc=$?
  tail -5 "$OUT/tests/pytest_gpu.log"; return $rc
}

profile() {  # device time per kind of kernel, eager against compiled (trainer.profile_steps)
  local attn=${PROFILE_ATTN:-flash} T=${PROFILE_T:-8192} c run rc=0
  mkdir -p "$OUT/profile"
  for c in ${PROFILE_COMPILE:-false true}; do
    run=prof-$attn-c$c
    FLASH_AUTOTUNE=0 LINEAR_AUTOTUNE=0 timeout "${BENCH_TIMEOUT:-900}" python3 train.py \
      model=350m attn="$attn" logger=jsonl trainer.progress=false trainer.seq_len="$T" \
      trainer.global_batch=$((32768 / T)) trainer.micro_batch=$((32768 / T)) trainer.steps=6 \
      trainer.log_every=1 trainer.val_every=0 trainer.ckpt_every=0 trainer.compile="$c" \
      trainer.profile_steps=3 data.document_mask=false run_name="$run" \
      hydra.run.dir="/tmp/runs/$run" "$@" 2>&1 | grep -E "step=|error|Error" | tail -3
    [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
    cp "/tmp/runs/$run/profile.json" "$OUT/profile/profile_$run.json" 2>/dev/null
    head -45 "/tmp/runs/$run/profile.txt" > "$OUT/profile/profile_$run.txt" 2>/dev/null
    python3 -c "import json, sys; d = json.load(open(sys.argv[1]))['share']; print(sys.argv[2], \
      {k: round(v, 3) for k, v in sorted(d.items(), key=lambda x: -x[1])})" \
      "$OUT/profile/profile_$run.json" "$run" 2>/dev/null
  done
  return $rc
}

run_part() {  # run_part PART ARGS...
  local part=$1; shift
  local limit=${BENCH_TIMEOUT:-900}
  case $part in
    env)
      nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit \
        --format=csv
      python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', \
        triton.__version__)"
      for pkg in fla transformers; do
        python3 -c "import $pkg; print('$pkg', getattr($pkg, '__version__', '?'))" 2>&1 | tail -1
      done ;;
    tests)        gpu_tests "${WORDS[@]}" ;;
    flash)        bench flash "$limit" scripts/bench/bench_attn.py "$@" ;;
    ahead)        FLASH_FWD_IMPL=triton bench ahead "$limit" scripts/bench/ab_kernels.py plain=.@FLASH_FWD_AHEAD=0 \
                    ahead=.@FLASH_FWD_AHEAD=1 --cases flash,flash64 --mode fwd --rounds 5 "$@" ;;
    gluon)        bench gluon "$limit" scripts/bench/bench_attn.py --backends \
                    flash,flash_dkdv_triton,flash_triton,sdpa_cudnn,flex,fla --seqlens \
                    4096,16384,65536 "$@" && bench gluon64 "$limit" scripts/bench/bench_attn.py \
                    --backends flash,flash_dkdv_triton,flash_triton,sdpa_cudnn,flex --seqlens \
                    8192,16384 --head-dim 64 "$@" ;;
    nsa-cmp)      for mode in fwd fwdbwd; do
                    bench nsa-cmp/$mode "$limit" scripts/bench/ab_kernels.py \
                      triton=.@NSA_CMP_IMPL=triton gluon=.@NSA_CMP_IMPL=gluon --cases nsa,nsa64k \
                      --mode $mode --rounds 3 "$@" || return 1
                  done ;;
    moba-gluon)   bench moba-gluon "$limit" scripts/bench/ab_kernels.py triton=.@MOBA_DKDV_IMPL=triton \
                    gluon=.@MOBA_DKDV_IMPL=gluon --cases moba,moba64k --mode fwdbwd --rounds 3 "$@" ;;
    moba-routed)  bench moba-routed "$limit" scripts/bench/ab_kernels.py \
                    triton=.@MOBA_ROUTED_IMPL=triton gluon=.@MOBA_ROUTED_IMPL=gluon \
                    --cases moba,moba64k --mode fwdbwd --rounds 3 "$@" \
                  && bench moba-routed-dq "$limit" scripts/bench/ab_kernels.py \
                    triton=.@MOBA_ROUTED_DQ_IMPL=triton gluon=.@MOBA_ROUTED_DQ_IMPL=gluon \
                    --cases moba,moba64k --mode fwdbwd --rounds 3 "$@" ;;
    moba-tile)    bench moba-tile "$limit" scripts/bench/ab_kernels.py \
                    triton=.@MOBA_TILE_IMPL=triton gluon=.@MOBA_TILE_IMPL=gluon \
                    --cases moba,moba64k --mode fwd --rounds 3 "$@" \
                  && bench moba-tile-dq "$limit" scripts/bench/ab_kernels.py \
                    triton=.@MOBA_TILE_DQ_IMPL=triton gluon=.@MOBA_TILE_DQ_IMPL=gluon \
                    --cases moba,moba64k --mode fwdbwd --rounds 3 "$@" ;;
    moba-heads)   bench moba-heads "$limit" scripts/bench/ab_kernels.py \
                    one=.@MOBA_HEAD_CHUNKS=1 pieces=.@MOBA_HEAD_CHUNKS=4 \
                    --cases moba,moba64k_gqa --mode fwdbwd --rounds 3 "$@" ;;
    moba-ncu)     mkdir -p "$OUT/moba-ncu"
                  for impl in ${MOBA_NCU_IMPLS:-triton gluon}; do
                    MOBA_DKDV_IMPL=$impl timeout "$limit" ncu --clock-control none \
                      --kernel-name "regex:${MOBA_NCU_KERNEL:-dkdv_kernel}" --launch-count 1 \
                      --section SpeedOfLight \
                      --section MemoryWorkloadAnalysis --section WarpStateStats \
                      --section LaunchStats --section Occupancy --section SchedulerStats \
                      python3 scripts/tune/tune_moba.py --once --seqlens 65536 "$@" \
                      > "$OUT/moba-ncu/$impl.txt" 2>&1 || return 1
                    grep -E "Duration|Throughput|Registers|Achieved Occupancy|Stall|Issued" \
                      "$OUT/moba-ncu/$impl.txt" | head -30
                  done ;;
    lightning)    bench lightning "$limit" scripts/bench/bench_linear.py "$@" ;;
    moba)         bench moba "$limit" scripts/bench/bench_moba.py "$@" ;;
    nsa)          bench nsa "$limit" scripts/bench/bench_nsa.py "$@" ;;
    nsa-parts)    bench nsa-parts "$limit" scripts/bench/bench_nsa.py --parts --seqlens 65536 \
                    --heads 64 --kv-heads 4 "$@" ;;
    moba-parts)   bench moba-parts "$limit" scripts/tune/tune_moba.py \
                    --seqlens 8192,16384,65536 "$@" ;;
    moba-sweep)   bench moba-sweep "$limit" scripts/tune/tune_moba.py --seqlens 65536 --sweep \
                    "$@" ;;
    linear-parts) bench linear-parts "$limit" scripts/tune/tune_linear.py "$@" \
                    && bench linear-parts "$limit" scripts/tune/tune_linear.py --decay "$@" ;;
    train)        bench train "$limit" scripts/bench/bench_train.py --models 125m --seqlens 8k \
                    --families sdpa,flash,lightning --doc-mask true --autotune --no-hf \
                    --steps 30 --steps-long 30 --warmup 10 --log-every 10 "$@" ;;
    e2e)          bench e2e "$limit" scripts/bench/bench_train.py "$@" ;;
    profile)      profile "$@" ;;
    recall)       bench recall "$limit" scripts/bench/bench_recall.py --model 350m --seq-len 8192 \
                    --eval-lengths 8192,32768 "$@" ;;
    run)          eval "$*" ;;
  esac
}

WORDS=("$@")
rc=0
for word in "$@"; do
  read -r part args <<< "$word"
  echo "== $part ${args:-}"
  # shellcheck disable=SC2086  # a part's extra arguments are split like a command line
  run_part "$part" $args 2>&1 | tee "$OUT/$part.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || { rc=1; echo "== $part failed"; }
done
if [ "${KEEP_CACHE:-0}" = 1 ] && [ -d .cache ]; then
  tar czf "$OUT/cache.tgz" .cache 2>/dev/null && ls -la "$OUT/cache.tgz"
fi
exit $rc
