#!/usr/bin/env bash
# Context parallelism on several GPUs under NCCL (issue 8), one script, results under $OUT:
#   equiv    loss per step of `torchrun --nproc_per_node N train.py attn=A cp.size=N
#            cp.strategy=S` against one GPU with the same global batch, for every family
#            and strategy it supports (ring without documents: it serves one per micro-batch)
#   scaling  weak scaling: tokens per GPU fixed (TOK), cp = 1, 2, 4, .. N; time per step
#            (PAIRS="flash:ring lightning:lasp" picks the family:strategy pairs)
#   longest  longest sequence trained with cp = N (350m, activation checkpointing), per family
#   ddpcp    dp = 2 × cp = N/2 against one GPU with the same global batch (N >= 4)
# GPU:  NGPU=8 STAGES="equiv scaling longest ddpcp" bash scripts/launch/multigpu_check.sh
#       (device tool: carry [".whl"] built by ../shared/device/wheels.sh: hydra, omegaconf, ...)
# CPU smoke of the script itself (gloo, tiny model, seconds):  SMOKE=1 NGPU=2 bash scripts/launch/multigpu_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/multigpu}; RUNS=$OUT/runs; mkdir -p "$RUNS"
STAGES=${STAGES:-"equiv scaling longest ddpcp"}
FAMILIES=${FAMILIES:-"flash sdpa linear lightning moba nsa"}   # equiv stage
export PYTHONUNBUFFERED=1 LONGCTX_CACHE=${LONGCTX_CACHE:-/tmp/longctx-cache} PYTHONPATH=$PWD
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
NGPU=${NGPU:-$(nvidia-smi -L 2>/dev/null | wc -l)}
[ "$NGPU" -ge 2 ] || { echo "multigpu_check.sh needs NGPU >= 2 (got $NGPU)"; exit 2; }
BASE="logger=jsonl logger.console=false trainer.progress=false trainer.val_every=0 trainer.ckpt_every=0"
if [ "${SMOKE:-0}" = 1 ]; then
  SMALL="model=tiny model.dim=32 model.n_layers=2 model.n_heads=4 model.n_kv_heads=2 data.max_bytes=300000"
  EQ_MODEL="$SMALL"; EQ_SEQ=256; BIG_MODEL="$SMALL"; TOK=256; LADDER="512 1024"; STEPS=3
else
  # 4 layers of width 512, 8 heads (2 KV heads): GQA on every path that supports it
  EQ_MODEL="model=125m model.n_layers=4 model.dim=512 model.n_heads=8 model.n_kv_heads=2"
  EQ_SEQ=${EQ_SEQ:-16384}; BIG_MODEL="model=350m"; TOK=${TOK:-32768}; STEPS=${STEPS:-8}
  LADDER=${LADDER:-"262144 524288 1048576 2097152 4194304"}
fi
sparse() {  # small blocks for the CPU smoke's short rows; the configs' defaults on GPU
  [ "${SMOKE:-0}" = 1 ] || return 0
  case $1 in moba) echo "attn.block_size=16";;
             nsa) echo "attn.cmp_block=8 attn.cmp_stride=4 attn.sel_block=8 attn.window=16";; esac
}
launch() {  # launch NPROC NAME ARGS...: one process without torchrun, else torchrun
  local n=$1 name=$2; shift 2
  local cmd=(python3)
  [ "$n" -gt 1 ] && cmd=(torchrun --standalone --nproc_per_node "$n")
  timeout "${RUN_TIMEOUT:-300}" "${cmd[@]}" train.py $BASE run_name="$name" \
    hydra.run.dir="$RUNS/$name" "$@" > "$RUNS/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc"; [ $rc -eq 0 ] || tail -3 "$RUNS/$name.log"
}
launch_refs() {  # launch_refs NAME ARGS... per line on stdin: one-GPU runs, NGPU at a time, one per GPU
  local i=0 line
  while read -r line; do
    [ -n "$line" ] || continue
    ( export CUDA_VISIBLE_DEVICES=$((i % NGPU)); launch 1 $line ) &
    i=$((i + 1)); [ $((i % NGPU)) -eq 0 ] && wait
  done
  wait
}
lin_heads() { case $1 in linear|lightning) echo "model.n_kv_heads=$2";; *) echo "";; esac; }

for stage in $STAGES; do
  case $stage in
    equiv)
      EQ="$EQ_MODEL trainer.seq_len=$EQ_SEQ trainer.global_batch=2 trainer.micro_batch=1 trainer.steps=$STEPS trainer.log_every=1"
      H() {  # the linear families: n_kv_heads = n_heads
        if [ "${SMOKE:-0}" = 1 ]; then echo "$(lin_heads $1 4) $(sparse $1)"; else echo "$(lin_heads $1 8) $(sparse $1)"; fi
      }
      strategies() { python3 -c "from parallel.context import SUPPORTS as S; print(' '.join(sorted(k for k, v in S.items() if '$1' in v)))"; }
      for attn in $FAMILIES; do   # one-GPU references first, one per GPU at a time
        echo "eq-$attn-1gpu attn=$attn $EQ $(H $attn)"
        case " $(strategies $attn) " in *" ring "*) echo "eq-$attn-1gpu-nodoc attn=$attn $EQ $(H $attn) data.document_mask=false";; esac
      done | launch_refs
      for attn in $FAMILIES; do
        for s in $(strategies $attn); do
          doc="" ; [ "$s" = ring ] && doc="data.document_mask=false"
          launch "$NGPU" eq-$attn-$s-cp$NGPU attn=$attn $EQ $(H $attn) $doc cp.size=$NGPU cp.strategy=$s
        done
      done ;;
    scaling)
      for pair in ${PAIRS:-flash:ring flash:allgather lightning:lasp moba:allgather nsa:allgather}; do
        attn=${pair%%:*}; s=${pair##*:}; doc=""; [ "$s" = ring ] && doc="data.document_mask=false"
        cp=1
        while [ $cp -le "$NGPU" ]; do
          extra=""; [ $cp -gt 1 ] && extra="cp.size=$cp cp.strategy=$s"
          launch $cp ws-$attn-$s-cp$cp $BIG_MODEL attn=$attn $doc $(sparse $attn) trainer.seq_len=$((TOK * cp)) \
            trainer.global_batch=1 trainer.micro_batch=1 trainer.steps=$STEPS trainer.log_every=$((STEPS / 2)) \
            trainer.activation_checkpointing=true $extra
          cp=$((cp * 2))
        done
      done ;;
    longest)
      for attn in flash lightning moba nsa; do
        eval "ladder=\${LADDER_$attn:-\$LADDER}"   # LADDER_flash=... overrides per family
        for T in $ladder; do
          RUN_TIMEOUT=${LONG_TIMEOUT:-${RUN_TIMEOUT:-300}} launch "$NGPU" long-$attn-$T $BIG_MODEL attn=$attn $(sparse $attn) trainer.seq_len=$T trainer.global_batch=1 \
            trainer.micro_batch=1 trainer.steps=2 trainer.log_every=1 trainer.activation_checkpointing=true \
            cp.size=$NGPU || true
          [ -s "$RUNS/long-$attn-$T/metrics.jsonl" ] || break
        done
      done ;;
    ddpcp)
      [ "$NGPU" -ge 4 ] || { echo "ddpcp needs NGPU >= 4: skipped"; continue; }
      DC="$BIG_MODEL attn=flash trainer.seq_len=$TOK trainer.global_batch=4 trainer.micro_batch=1 trainer.steps=$STEPS trainer.log_every=1 trainer.activation_checkpointing=true"
      launch 1 dc-1gpu $DC
      launch "$NGPU" dc-dp2-cp$((NGPU / 2)) $DC cp.size=$((NGPU / 2)) ;;
    *) eval "$stage" ;;
  esac
done

python3 - "$OUT" "$NGPU" <<'PY'
import glob, json, os, sys
out, ngpu = sys.argv[1], int(sys.argv[2])
def rows(name):
    f = os.path.join(out, "runs", name, "metrics.jsonl")
    if not os.path.exists(f):
        return []
    return [r for r in (json.loads(l) for l in open(f)) if "loss" in r and "tokens_per_s" in r]
res = {"ngpu": ngpu, "equiv": [], "scaling": [], "longest": {}, "ddpcp": None}
try:
    import torch
    res["card"] = os.environ.get("CARD") or (torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
except Exception:
    res["card"] = "?"
def runs(pattern):
    return [d for d in sorted(glob.glob(os.path.join(out, "runs", pattern))) if os.path.isdir(d)]
for d in runs("eq-*-cp*"):
    name = os.path.basename(d)
    attn, strat = name.split("-")[1], name.split("-")[2]
    ref = rows(f"eq-{attn}-1gpu-nodoc" if strat == "ring" else f"eq-{attn}-1gpu")
    got = rows(name)
    diff = max((abs(a["loss"] - b["loss"]) / abs(b["loss"]) for a, b in zip(got, ref)), default=None)
    gdiff = max((abs(a["grad_norm"] - b["grad_norm"]) / abs(b["grad_norm"]) for a, b in zip(got, ref)), default=None)
    res["equiv"].append(dict(attn=attn, strategy=strat, steps=len(got), max_rel_loss_diff=diff,
                             max_rel_grad_norm_diff=gdiff))
for d in runs("ws-*"):
    name = os.path.basename(d)
    r = rows(name)
    if r:
        _, attn, strat, cp = name.split("-")
        res["scaling"].append(dict(attn=attn, strategy=strat, cp=int(cp[2:]),
                                   step_time_s=r[-1]["step_time_s"], peak_mem_gb=r[-1].get("peak_mem_gb")))
for s in res["scaling"]:
    base = [x for x in res["scaling"] if (x["attn"], x["strategy"], x["cp"]) == (s["attn"], s["strategy"], 1)]
    s["efficiency"] = base[0]["step_time_s"] / s["step_time_s"] if base else None
for d in runs("long-*"):
    _, attn, t = os.path.basename(d).split("-")
    if rows(os.path.basename(d)):
        res["longest"][attn] = max(res["longest"].get(attn, 0), int(t))
a, b = rows("dc-1gpu"), rows(f"dc-dp2-cp{ngpu // 2}")
if a and b:
    res["ddpcp"] = dict(max_rel_loss_diff=max(abs(x["loss"] - y["loss"]) / abs(y["loss"]) for x, y in zip(b, a)),
                        tokens_per_s=b[-1]["tokens_per_s"], tokens_per_s_1gpu=a[-1]["tokens_per_s"])
json.dump(res, open(os.path.join(out, "multigpu.json"), "w"), indent=1)
fmt = lambda x: "-" if x is None else f"{x:.2e}"
md = [f"{res['card']} × {ngpu}", "", "| equivalence | strategy | steps | max rel. loss diff | max rel. grad-norm diff |",
      "|---|---|---:|---:|---:|"]
md += [f"| {e['attn']} | {e['strategy']} | {e['steps']} | {fmt(e['max_rel_loss_diff'])} | {fmt(e['max_rel_grad_norm_diff'])} |"
       for e in res["equiv"]]
md += ["", "| weak scaling | strategy | cp | s/step | efficiency | peak GB |", "|---|---|---:|---:|---:|---:|"]
md += [f"| {s['attn']} | {s['strategy']} | {s['cp']} | {s['step_time_s']:.3f} | "
       + ("-" if s["efficiency"] is None else f"{s['efficiency']:.2f}") + f" | {s['peak_mem_gb'] or 0:.1f} |"
       for s in res["scaling"]]
md += ["", "longest context trained: " + ", ".join(f"{k} {v:,}" for k, v in res["longest"].items())]
if res["ddpcp"]:
    md += ["", f"dp 2 × cp {ngpu // 2}: {res['ddpcp']}"]
open(os.path.join(out, "multigpu.md"), "w").write("\n".join(md) + "\n")
print("\n".join(md))
PY
