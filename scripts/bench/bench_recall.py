"""Recall by attention family: train each briefly on the same token budget, then eval.py's passkey
and MQAR grids; one table and the heat maps.

    python3 scripts/bench/bench_recall.py --families flash,lightning,moba,nsa,hybrid \
        --model 350m --seq-len 8192 --steps 300 --data mqar --eval-lengths 8192,32768 --out $OUT

Per family: `train.py` (model, seq_len, global batch `--rows` × seq_len tokens per step, the
same for every family; `hybrid` is 7 lightning : 1 flash layers) on `--data` (mqar: key-value
recall rows, passkey: needle rows, builtin: the corpus), then `eval.py` on its last checkpoint
at `--eval-lengths`. Each family's run gets `--family-timeout` seconds in all; a family that
fails or runs out of time is a row saying so, and the others still run. Writes
<out>/recall.json, recall.md, <out>/<family>/{eval.json,passkey.png,mqar.png,train.log,eval.log};
the run folders (with their checkpoints) go to --work.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HYBRID = ["attn=lightning", "model.layer_pattern=[" + ",".join(["lightning"] * 7 + ["flash"]) + "]"]
DATA = {"mqar": ["data=mqar", "data.n_pairs=64", "data.n_keys=128", "data.n_values=128"],
        "passkey": ["data=passkey"], "builtin": ["data=builtin"]}


def run(cmd: list[str], limit: float, log: Path) -> int:
    with open(log, "w") as f:
        try:
            return subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                  timeout=max(limit, 1)).returncode
        except subprocess.TimeoutExpired:
            return 124


def one_family(family: str, a, out: Path) -> dict:
    folder, t0 = out / family, time.time()
    folder.mkdir(parents=True, exist_ok=True)
    run_dir = Path(a.work) / family  # checkpoints stay out of --out (GBs at 350m)
    attn = HYBRID if family == "hybrid" else [f"attn={family}"]
    lengths = ",".join(a.eval_lengths.split(","))
    train_cmd = [sys.executable, "train.py", f"model={a.model}", *attn, *DATA[a.data],
                 "logger=jsonl", "trainer.progress=false", f"trainer.seq_len={a.seq_len}",
                 f"trainer.global_batch={a.rows}", "trainer.micro_batch=1",
                 f"trainer.steps={a.steps}", "trainer.log_every=10", "trainer.val_every=0",
                 f"trainer.ckpt_every={a.steps}", f"trainer.compile={str(a.compile).lower()}",
                 f"optim.lr={a.lr}", f"optim.warmup_steps={max(a.steps // 10, 1)}",
                 f"hydra.run.dir={run_dir}"]
    rc = run(train_cmd, a.family_timeout, folder / "train.log")
    row = {"family": family, "train_rc": rc, "train_s": round(time.time() - t0, 1)}
    summary = run_dir / "summary.json"
    if summary.exists():
        s = json.loads(summary.read_text())
        row.update(tokens_per_s=s.get("tokens_per_s"), final_train_loss=s.get("final_train_loss"))
    if rc != 0:
        return row
    eval_cmd = [sys.executable, "eval.py", f"run={run_dir}", f"out={folder}",
                "eval.position_loss=false", f"eval.samples={a.samples}",
                f"eval.passkey_lengths=[{lengths}]", f"eval.mqar_lengths=[{lengths}]",
                f"eval.mqar_pairs=[{a.mqar_pairs}]", f"eval.depths=[{a.depths}]", "wandb=false"]
    rc = run(eval_cmd, a.family_timeout - (time.time() - t0), folder / "eval.log")
    row["eval_rc"] = rc
    if rc == 0:
        ev = json.loads((folder / "eval.json").read_text())
        row["passkey"], row["mqar"] = ev.get("passkey"), ev.get("mqar")
    row["total_s"] = round(time.time() - t0, 1)
    return row


def mean(grid) -> float | None:
    cells = [v for r in grid or [] for v in r if v is not None]
    return sum(cells) / len(cells) if cells else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", default="flash,lightning,moba,nsa,hybrid")
    ap.add_argument("--model", default="350m")
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--rows", type=int, default=4, help="rows per step (global batch)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--data", default="mqar", choices=sorted(DATA))
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--eval-lengths", default="8192,32768")
    ap.add_argument("--mqar-pairs", default="16,64")
    ap.add_argument("--depths", default="0.0,0.5,1.0")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--family-timeout", type=float, default=900)
    ap.add_argument("--work", default="/tmp/bench_recall", help="run folders (checkpoints)")
    ap.add_argument("--out", default="bench_out")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("FLASH_AUTOTUNE", "0")
    os.environ.setdefault("LINEAR_AUTOTUNE", "0")
    rows = []
    for family in a.families.split(","):
        rows.append(one_family(family, a, out))
        print(json.dumps(rows[-1])[:400], flush=True)
        (out / "recall.json").write_text(json.dumps({"args": vars(a), "rows": rows}, indent=1))
    lines = [f"| family ({a.model}, T {a.seq_len}, {a.steps} steps × {a.rows} rows, data={a.data}) "
             "| tokens/s | train loss | passkey acc (mean) | MQAR acc (mean) | note |",
             "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        note = "" if r.get("eval_rc") == 0 else f"train exit {r['train_rc']}" + (
            f", eval exit {r['eval_rc']}" if "eval_rc" in r else "")
        cells = [r.get("tokens_per_s"), r.get("final_train_loss"),
                 mean((r.get("passkey") or {}).get("accuracy")),
                 mean((r.get("mqar") or {}).get("accuracy"))]
        lines.append(f"| {r['family']} | " + " | ".join(
            "" if v is None else f"{v:,.0f}" if i == 0 else f"{v:.3f}" for i, v in enumerate(cells))
            + f" | {note} |")
    (out / "recall.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
