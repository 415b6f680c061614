"""Checkpoint formats under FSDP2: time the loop waits, bytes each rank writes, rank 0's peak memory.

    python3 scripts/bench/bench_checkpoint.py --nproc 2 --model 125m --out bench_out   # CPU, gloo

Per format (full: rank 0 gathers and writes everything; sharded: torch.distributed.checkpoint,
each rank writes its part; sharded async: written in the background) one torchrun of train.py,
parallel=fsdp, 3 steps with a checkpoint after each. Reported: the median `ckpt_s` of the
three checkpoints (metrics.jsonl), the bytes of the last checkpoint's files by writer (rank 0
vs the largest other rank), and rank 0's peak memory after the run (`peak_mem_gb` of the last
log row: on CPU the process's max RSS, which includes the gathered state under full).
Writes <out>/bench_checkpoint.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FORMATS = {"full": ["trainer.ckpt_format=full"], "sharded": ["trainer.ckpt_format=sharded"],
           "sharded async": ["trainer.ckpt_format=sharded", "trainer.ckpt_async=true"]}


def one_run(fmt: str, a, work: Path) -> dict:
    run = work / fmt.replace(" ", "_")
    args = [f"model={a.model}", "parallel=fsdp", "logger=jsonl", "logger.console=false",
            "trainer.progress=false", f"trainer.seq_len={a.seq_len}",
            f"trainer.global_batch={a.nproc}", "trainer.micro_batch=1", "trainer.steps=3",
            "trainer.log_every=1", "trainer.val_every=0", "trainer.ckpt_every=1",
            "trainer.ckpt_keep=1", f"data.cache_dir={work / 'cache'}", f"hydra.run.dir={run}",
            *FORMATS[fmt]]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={a.nproc}", str(ROOT / "train.py"), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(f"{fmt}: exit {r.returncode}\n{r.stderr[-3000:]}")
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    last = sorted((run / "checkpoints").glob("step_*"))[-1]
    files = json.loads((last / "meta.json").read_text())["files"]
    by_rank = {}
    for name, rec in files.items():
        # DCP shard files name their writer (__<rank>_0.distcp); the rest is rank 0's but rank_<r>.pt
        rank = (int(name.split("__")[1].split("_")[0]) if "__" in name
                else int(name[5:-3]) if name.startswith("rank_") else 0)
        by_rank[rank] = by_rank.get(rank, 0) + rec["size"]
    return {"ckpt_s": statistics.median(r["ckpt_s"] for r in rows if "ckpt_s" in r),
            "rank0_bytes": by_rank.get(0, 0),
            "other_rank_bytes": max((v for k, v in by_rank.items() if k != 0), default=0),
            "rank0_peak_gb": [r for r in rows if "loss" in r][-1]["peak_mem_gb"],
            "step_time_s": statistics.median(r["step_time_s"] for r in rows if "loss" in r)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--model", default="125m")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--out", default="bench_out")
    a = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in FORMATS:
            results[fmt] = one_run(fmt, a, Path(tmp))
            print(fmt, results[fmt], flush=True)
    rows = [f"| format ({a.model}, {a.nproc} ranks, FSDP2) | loop waits s | rank 0 writes MB | "
            "other rank writes MB | rank 0 peak GB | step s |", "|---|---:|---:|---:|---:|---:|"]
    rows += [f"| {fmt} | {r['ckpt_s']:.2f} | {r['rank0_bytes'] / 1e6:.0f} | "
             f"{r['other_rank_bytes'] / 1e6:.0f} | {r['rank0_peak_gb']:.2f} | {r['step_time_s']:.2f} |"
             for fmt, r in results.items()]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_checkpoint.json").write_text(json.dumps({"args": vars(a), "results": results},
                                                          indent=1))
    (out / "bench_checkpoint.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
