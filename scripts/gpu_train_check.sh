#!/usr/bin/env bash
# GPU smoke + throughput of the training loop on one GPU (the device machine):
#   bash scripts/gpu_train_check.sh          (carry .whl: ../shared/device/wheels.sh .whl)
# Trains the 125m model for a few steps on the builtin corpus (byte tokenizer, no network) with
# each available attention family, bf16 autocast, and records tokens/s, TGS, MFU and peak
# memory from metrics.jsonl into $OUT/train_gpu.json and a Markdown table.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
export LONGCTX_CACHE=/tmp/longctx-cache PYTHONUNBUFFERED=1
SEQ=${SEQ:-8192}
for attn in ${FAMILIES:-sdpa flash lightning}; do
  [ -f "configs/attn/$attn.yaml" ] || continue
  for ac in false; do
    timeout ${RUN_TIMEOUT:-90} python3 train.py model=125m attn=$attn logger=jsonl trainer.progress=false \
      trainer.seq_len=$SEQ trainer.global_batch=4 trainer.micro_batch=4 trainer.steps=${STEPS:-30} \
      trainer.log_every=10 trainer.val_every=0 trainer.ckpt_every=0 \
      trainer.activation_checkpointing=$ac data.val_batches=2 \
      run_name=gpu-$attn-ac$ac hydra.run.dir=/tmp/runs/gpu-$attn-ac$ac 2>&1 | tail -4
  done
done
python3 - "$OUT" <<'PY'
import glob, json, sys, torch
out = sys.argv[1]
rows = []
for f in sorted(glob.glob("/tmp/runs/*/metrics.jsonl")):
    last = [json.loads(l) for l in open(f) if '"loss"' in l][-1]
    last["run"] = f.split("/")[-2]
    rows.append(last)
meta = {"card": torch.cuda.get_device_name(), "torch": torch.__version__}
json.dump({"meta": meta, "runs": rows}, open(f"{out}/train_gpu.json", "w"), indent=1)
lines = [f"card {meta['card']}, torch {meta['torch']}", "",
         "| run | loss | tokens/s | TGS | MFU | peak GB |", "|---|---|---|---|---|---|"]
for r in rows:
    mfu = f"{r['mfu']:.3f}" if r.get("mfu") is not None else "-"
    lines.append(f"| {r['run']} | {r['loss']:.3f} | {r['tokens_per_s']:.0f} | {r['tgs']:.0f} | "
                 f"{mfu} | {r['peak_mem_gb']:.1f} |")
open(f"{out}/train_gpu.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
