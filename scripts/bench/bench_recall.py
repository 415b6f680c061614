"""Recall by attention family: train each briefly on the same token budget, then eval.py's passkey
and MQAR grids; one table and the heat maps.

    python3 scripts/bench/bench_recall.py --families flash,lightning,moba,nsa,hybrid \
        --model 350m --seq-len 8192 --rows 2 --steps 400 --data recall --compile \
        --eval-lengths 8192,32768 --out $OUT

Per family: `train.py` (model, seq_len, global batch `--rows` × seq_len tokens per step, the
same for every family; `hybrid` is 7 lightning : 1 flash layers) on `--data` (recall: MQAR
rows of 8-64 pairs and passkey rows, configs/data/recall.yaml; mqar: key-value recall rows;
passkey: needle rows; builtin: the corpus), then `eval.py` on its last checkpoint at
`--eval-lengths`. Each family's run gets `--family-timeout` seconds in all; a family that fails
or runs out of time is a row saying so, and the others still run. Writes <out>/recall.json,
recall.md, <out>/<family>/{eval.json,passkey.png,mqar.png,train.log,eval.log,metrics.jsonl};
the run folders (with their checkpoints) go to --work. `--plot FOLDER...` redraws
<out>/recall_loss.png (training loss per family), recall_mqar.png (MQAR accuracy per family
and length) and, for --data builtin (eval.py's position loss on), recall_position.png
(validation loss by position at T and 2T) from finished result folders, e.g. two device calls'
halves.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HYBRID = ["attn=lightning", "model.layer_pattern=[" + ",".join(["lightning"] * 7 + ["flash"]) + "]"]
DATA = {"recall": ["data=recall"],
        "mqar": ["data=mqar", "data.n_pairs=64", "data.n_keys=128", "data.n_values=128"],
        "passkey": ["data=passkey"],
        # rows cross documents unmasked, as in the end-to-end table: with document masks NSA's
        # compressed-block plan reads cu_seqlens on the host in every layer (docs/nsa_notes.md)
        "builtin": ["data=builtin", "data.document_mask=false"]}


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
                 f"hydra.run.dir={run_dir}", *a.set]
    rc = run(train_cmd, a.family_timeout, folder / "train.log")
    row = {"family": family, "train_rc": rc, "train_s": round(time.time() - t0, 1)}
    if (run_dir / "metrics.jsonl").exists():  # the loss curve (kilobytes) comes back with --out
        shutil.copy(run_dir / "metrics.jsonl", folder / "metrics.jsonl")
    summary = run_dir / "summary.json"
    if summary.exists():
        s = json.loads(summary.read_text())
        row.update(tokens_per_s=s.get("tokens_per_s"), final_train_loss=s.get("final_train_loss"))
    if rc != 0:
        return row
    eval_cmd = [sys.executable, "eval.py", f"run={run_dir}", f"out={folder}",
                f"eval.position_loss={str(a.data == 'builtin').lower()}",
                f"eval.samples={a.samples}", f"eval.val_rows={a.val_rows}",
                f"eval.passkey_lengths=[{lengths}]", f"eval.mqar_lengths=[{lengths}]",
                f"eval.mqar_pairs=[{a.mqar_pairs}]", f"eval.depths=[{a.depths}]", "wandb=false"]
    rc = run(eval_cmd, a.family_timeout - (time.time() - t0), folder / "eval.log")
    row["eval_rc"] = rc
    if rc == 0:
        ev = json.loads((folder / "eval.json").read_text())
        row["passkey"], row["mqar"] = ev.get("passkey"), ev.get("mqar")
        if "position_loss" in ev:
            row["position_loss"] = ev["position_loss"]
    row["total_s"] = round(time.time() - t0, 1)
    return row


def mean(grid) -> float | None:
    cells = [v for r in grid or [] for v in r if v is not None]
    return sum(cells) / len(cells) if cells else None


def last_buckets(position_loss) -> str:
    """'2.345 / 2.567': each length's loss in its last position bucket ('' without them)."""
    cells = [p["loss"][-1] for p in (position_loss or {}).values()]
    return " / ".join("–" if v is None else f"{v:.3f}" for v in cells)


def plot(folders: list[Path], out: Path) -> list[Path]:
    """recall_loss.png (training loss by step, one line per family) and recall_mqar.png (MQAR
    accuracy by pair count, one panel per evaluated length) from result folders' recall.json
    and <family>/metrics.jsonl."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    results = [(f, json.loads((f / "recall.json").read_text())) for f in folders]
    rows = [(f, r) for f, res in results for r in res["rows"]]
    # synthetic tasks score the answers only, corpus rows every token
    corpus = all(res["args"].get("data") == "builtin" for _, res in results)
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for folder, r in rows:
        log = folder / r["family"] / "metrics.jsonl"
        points = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        points = [p for p in points if "loss" in p and "step" in p]
        if points:
            ax.plot([p["step"] for p in points], [p["loss"] for p in points], label=r["family"])
    ax.set(xlabel="step", ylabel="training loss" + ("" if corpus else " (answers only)"),
           title="training loss")
    ax.legend()
    fig.tight_layout()
    paths = [out / "recall_loss.png"]
    fig.savefig(paths[0], dpi=120)
    scored = [r for _, r in rows if r.get("mqar")]
    if scored:
        lengths = scored[0]["mqar"]["lengths"]
        fig, axes = plt.subplots(1, len(lengths), figsize=(4.2 * len(lengths), 3.6), squeeze=False)
        for j, T in enumerate(lengths):
            ax = axes[0][j]
            for r in scored:
                m = r["mqar"]
                ax.plot(m["pairs"], [row[j] for row in m["accuracy"]], marker="o",
                        label=r["family"])
            ax.plot(m["pairs"], m["chance"], "k:", label="copying chance 1/n")
            ax.set(xscale="log", xlabel="key-value pairs", ylabel="MQAR accuracy", ylim=(0, 1.02),
                   title=f"length {T}")
            ax.minorticks_off()  # log-axis minor labels would print over the pair counts
            ax.set_xticks(m["pairs"], [str(n) for n in m["pairs"]])
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        paths.append(out / "recall_mqar.png")
        fig.savefig(paths[-1], dpi=120)
    with_pos = [r for _, r in rows if r.get("position_loss")]
    if with_pos:
        lengths = list(with_pos[0]["position_loss"])
        fig, axes = plt.subplots(1, len(lengths), figsize=(4.8 * len(lengths), 3.6), squeeze=False)
        for j, T in enumerate(lengths):
            ax = axes[0][j]
            for r in with_pos:
                p = r["position_loss"].get(T)
                if p:
                    mid = [(a + b) / 2 for a, b in zip(p["edges"][:-1], p["edges"][1:])]
                    ax.plot(mid, p["loss"], marker=".", label=r["family"])
            # eval.json before the visible-context buckets has no axis: RoPE positions
            axis = next((r["position_loss"][T].get("axis") for r in with_pos
                         if r["position_loss"].get(T)), None) or "position in the document"
            ax.set(xlabel=f"{axis} (tokens)" if axis == "visible context" else axis,
                   ylabel="validation loss",
                   title=f"rows of {T} tokens")
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        paths.append(out / "recall_position.png")
        fig.savefig(paths[-1], dpi=120)
    plt.close("all")
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", default="flash,lightning,moba,nsa,hybrid")
    ap.add_argument("--model", default="350m")
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--rows", type=int, default=2, help="rows per step (global batch)")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--data", default="recall", choices=sorted(DATA))
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="one more train.py override (repeatable), e.g. data.min_len=0")
    ap.add_argument("--eval-lengths", default="8192,32768")
    ap.add_argument("--mqar-pairs", default="8,16,32,64")
    ap.add_argument("--depths", default="0.0,0.5,1.0")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--val-rows", type=int, default=32,
                    help="eval.val_rows: position-loss rows per length (capped by the split)")
    ap.add_argument("--family-timeout", type=float, default=900)
    ap.add_argument("--work", default="/tmp/bench_recall", help="run folders (checkpoints)")
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--plot", nargs="+", type=Path, help="only draw the figures of these folders")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.plot:
        print("\n".join(map(str, plot(a.plot, out))))
        return
    os.environ.setdefault("FLASH_AUTOTUNE", "0")
    os.environ.setdefault("LINEAR_AUTOTUNE", "0")
    rows = []
    for family in a.families.split(","):
        rows.append(one_family(family, a, out))
        print(json.dumps(rows[-1])[:400], flush=True)
        (out / "recall.json").write_text(json.dumps({"args": vars(a), "rows": rows}, indent=1))
    lines = [f"| family ({a.model}, T {a.seq_len}, {a.steps} steps × {a.rows} rows, data={a.data}) "
             "| tokens/s | train loss | passkey acc (mean) | MQAR acc (mean) "
             "| val loss, last position bucket at T / 2T | note |",
             "|---|---:|---:|---:|---:|---|---|"]
    for r in rows:
        note = "" if r.get("eval_rc") == 0 else f"train exit {r['train_rc']}" + (
            f", eval exit {r['eval_rc']}" if "eval_rc" in r else "")
        cells = [r.get("tokens_per_s"), r.get("final_train_loss"),
                 mean((r.get("passkey") or {}).get("accuracy")),
                 mean((r.get("mqar") or {}).get("accuracy"))]
        lines.append(f"| {r['family']} | " + " | ".join(
            "" if v is None else f"{v:,.0f}" if i == 0 else f"{v:.3f}" for i, v in enumerate(cells))
            + f" | {last_buckets(r.get('position_loss'))} | {note} |")
    (out / "recall.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot([out], out)


if __name__ == "__main__":
    main()
