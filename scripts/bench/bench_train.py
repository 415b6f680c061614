#!/usr/bin/env python
"""End-to-end training throughput: our train.py per attention family against a Hugging Face
Llama of the same shape, in one run (one device call).

    python3 scripts/bench/bench_train.py --out OUT [--models 350m] [--families sdpa,flash,...]
        [--seqlens 2k,8k,32k,128k] [--compile false,true] [--budget 570] [--longest flash,...]
    python3 scripts/bench/bench_train.py --dry-run ...          # print the commands only
    python3 scripts/bench/bench_train.py --device cpu --models tiny --seqlens 64,128 \
        --tokens 128 --micro-tokens 128 --steps 4 --warmup 2    # CPU smoke of the pipeline

Sweep: every (model, family, trainer.compile, data.document_mask, T) is one `train.py`
subprocess with `logger=jsonl trainer.val_every=0 trainer.ckpt_every=0` and a per-run timeout;
its metrics.jsonl gives tokens/s, MFU (train.py's: 6·N + each layer's attention FLOPs) and peak
memory. Every T trains --tokens tokens per optimizer step: global_batch = tokens / T (at least
one row), micro_batch the largest divisor of it within --micro-tokens / T rows (gradient
accumulation makes up the rest), activation checkpointing from T >= --ac-from. The steady state
is the log windows after the first --warmup steps (compile, autotune and allocator warm-up sit
in those). The HF anchor (`scripts/bench/hf_anchor.py`: LlamaForCausalLM, SDPA, bf16 autocast over
fp32 weights, fused AdamW, the same rows, accumulation and clipping) runs the same way at each
T, and its MFU counts our model's FLOPs for the same shape, so the MFU columns compare.

Families: sdpa, flash, linear, lightning, moba, nsa and hybrid (attn=lightning with
model.layer_pattern = 7 lightning : 1 flash, MiniMax-01 style).

Documents: train.py masks attention at document boundaries by default; HF does not.
--doc-mask false (the default) gives ours data.document_mask=false, the like-for-like row; a
list (false,true) adds the masked rows. Each row records its setting.

Longest (--longest flash,lightning[:start]): per family, T doubles from --longest-start (or
`family:start`) with micro_batch 1, global_batch 1 and activation checkpointing, until a run
fails (OOM, error, timeout), the corpus is too short for one row, --longest-max is passed, or
the next run is predicted not to fit the --budget. The longest T that trained >= --longest-steps
steps with finite, falling loss is recorded.

Outputs under --out (default $OUT or ./bench_out): bench_train.json (meta: card, versions,
date, commit, settings; one row per run, failures with their reason and last log lines),
bench_train.md (a table per model: rows family (+compile, +docs), columns T, cells tokens/s,
MFU, peak GB and the ratio to HF's tokens/s at that T), bench_train.png (tokens/s over T per
family, log2 x-axis, as in the Lightning Attention-2 paper's TGS figure). Both files are
rewritten after every run, so a cut-off call still leaves what it measured. The Markdown table
is printed last. The arguments and the plan of runs: train_plan.py; reading a run's metrics
and writing the report: train_report.py.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import ROOT
from train_plan import (FAMILIES, longest_spec, model_max_seq, parse_bools, parse_families,
                        parse_size, parse_sizes, plan_sweep, run_name, spec_max_bytes)
from train_report import (build_meta, classify, fmt_size, label, loss_falls, read_metrics,
                          write_outputs)

# step-time growth per doubling of T before two runs have measured it: linear-time attention
# (lightning, linear) doubles; MoBA/NSA attend a bounded number of keys per query plus a
# T/block gate or compressed branch; softmax (sdpa, flash, hybrid's flash layers, HF) quadruples
FIRST_GROWTH = {"lightning": 2.0, "linear": 2.0, "moba": 2.5, "nsa": 2.5}
# the kernels' autotuners time several configs per new shape (about a minute before the first
# step); the benchmark takes their tuned defaults unless --autotune
AUTOTUNE_ENV = ("FLASH_AUTOTUNE", "LINEAR_AUTOTUNE")


def command(a, spec: dict, run_dir: Path) -> list[str]:
    py, T = sys.executable, spec["T"]
    max_bytes = spec_max_bytes(a, spec)
    longest = spec["kind"] == "longest"
    if spec["impl"] == "hf":
        cmd = [py, "scripts/bench/hf_anchor.py", "--model", spec["model"], "--seq-len", str(T),
               "--global-batch", str(spec["global_batch"]),
               "--micro-batch", str(spec["micro_batch"]), "--steps", str(spec["steps"]),
               "--log-every", str(spec["log_every"]), "--device", a.device, "--dtype", a.dtype,
               "--seed", str(a.seed), "--out-dir", str(run_dir)]
        cmd += ["--ac"] if spec["ac"] else []
        cmd += ["--compile"] if spec["compile"] else []
        cmd += ["--max-bytes", str(max_bytes)] if max_bytes else []
        cmd += ["--peak-tflops", str(a.peak_tflops)] if a.peak_tflops else []
        cmd += ["--warmup-steps", "1"] if longest else []
        return cmd
    b = lambda v: "true" if v else "false"  # noqa: E731 (Hydra's spelling of booleans)
    cmd = [py, "train.py", f"model={spec['model']}", *FAMILIES[spec["family"]], "logger=jsonl",
           "trainer.progress=false", "trainer.val_every=0", "trainer.ckpt_every=0",
           "trainer.resume=none", f"trainer.steps={spec['steps']}",
           f"trainer.log_every={spec['log_every']}", f"trainer.seq_len={T}",
           f"trainer.global_batch={spec['global_batch']}",
           f"trainer.micro_batch={spec['micro_batch']}",
           f"trainer.activation_checkpointing={b(spec['ac'])}",
           f"trainer.compile={b(spec['compile'])}", f"trainer.device={a.device}",
           f"trainer.dtype={a.dtype}", f"trainer.seed={a.seed}",
           f"data.document_mask={b(spec['doc_mask'])}"]
    if T > model_max_seq(spec["model"]):  # the model refuses longer rows; RoPE needs no table
        cmd.append(f"model.max_seq_len={T}")
    if max_bytes:
        cmd.append(f"data.max_bytes={max_bytes}")
    if a.peak_tflops:
        cmd.append(f"trainer.peak_tflops={a.peak_tflops}")
    if longest:  # full learning rate from step 1, so three steps can show the loss falling
        cmd.append("optim.warmup_steps=1")
        cmd += a.longest_override
    cmd += a.override
    cmd += [f"run_name={run_name(spec)}", f"hydra.run.dir={run_dir}"]
    return cmd


def run_env(a) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if not a.autotune:
        for k in AUTOTUNE_ENV:
            env.setdefault(k, "0")  # an explicit setting in the caller's environment wins
    # the repo on the path for scripts/bench/hf_anchor.py's imports, after whatever the caller set
    # (the device machine puts its carried wheels there)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths + ([str(ROOT)] if str(ROOT) not in paths else []))
    return env


# ----------------------------------------------------------------------------- running
def execute(cmd: list[str], run_dir: Path, timeout: float, env: dict) -> dict:
    """Run one command in its own process group (so a timeout also ends inductor's compile
    workers), output to run_dir/bench_log.txt."""
    if run_dir.exists():
        shutil.rmtree(run_dir)  # metrics.jsonl is appended to: never read an older run's lines
    run_dir.mkdir(parents=True)
    log_path = run_dir / "bench_log.txt"
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        timed_out = False
        try:
            rc = proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            timed_out = True
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            rc = proc.wait()
    return dict(rc=rc, timed_out=timed_out, wall_s=time.monotonic() - t0,
                log=log_path.read_text(errors="replace"))


class Runner:
    def __init__(self, a):
        self.a, self.env = a, run_env(a)
        self.t0 = time.monotonic()
        self.work = Path(a.work_dir or tempfile.mkdtemp(prefix="bench_train_"))
        self.count = 0

    def left(self) -> float:
        return self.a.budget - (time.monotonic() - self.t0) if self.a.budget else float("inf")

    def run(self, spec: dict, total: int | None = None, timeout: float | None = None) -> dict:
        a = self.a
        self.count += 1
        run_dir = self.work / run_name(spec)
        cmd = command(a, spec, run_dir)
        row = dict(spec, cmd=shlex.join(cmd), status=None, reason="")
        left = self.left() - a.reserve_s
        if spec["impl"] == "hf" and importlib.util.find_spec("transformers") is None:
            row.update(status="skipped", reason="the HF anchor needs `transformers` (pip install "
                       "transformers), not installed for this Python; --no-hf leaves it out")
        elif left < a.min_run_s:
            row.update(status="skipped", reason=f"budget: {max(left, 0):.0f} s left "
                       f"(--budget {a.budget:g} minus --reserve-s {a.reserve_s:g}) < "
                       f"--min-run-s {a.min_run_s:g}")
        else:
            limit = min(timeout or a.run_timeout, left)
            res = execute(cmd, run_dir, limit, self.env)
            metrics = read_metrics(run_dir / "metrics.jsonl", spec["warmup"])
            status, reason = classify(res, metrics)
            if status == "timeout" and limit < (timeout or a.run_timeout):
                reason += (f" (the remaining --budget, not the run's timeout, limited it to "
                           f"{limit:.0f} s)")
            row.update(metrics, status=status, reason=reason, wall_s=round(res["wall_s"], 1),
                       timeout_s=round(limit, 1))
            if status != "ok":
                row["log_tail"] = res["log"].splitlines()[-a.tail_lines:]
            anchor = run_dir / "anchor.json"
            if anchor.exists():
                row["anchor"] = json.loads(anchor.read_text())
        self._print(row, total)
        return row

    def _print(self, row: dict, total: int | None):
        el = time.monotonic() - self.t0
        head = (f"[{self.count}{'/' + str(total) if total else ''} {el:5.0f}s] {row['model']} "
                f"{label(row)} T={fmt_size(row['T'])} G={row['global_batch']} "
                f"mb={row['micro_batch']}{' ac' if row['ac'] else ''}:")
        if row["status"] == "ok" and row.get("tokens_per_s"):
            mfu = f" MFU {100 * row['mfu']:.1f}%" if row.get("mfu") is not None else ""
            print(f"{head} {row['tokens_per_s']:,.0f} tok/s{mfu} peak "
                  f"{row['peak_mem_gb']:.1f} GB loss {row['loss_first']:.3f}->"
                  f"{row['loss_last']:.3f} ({row['wall_s']:.0f} s)", flush=True)
        else:
            print(f"{head} {row['status']}: {row['reason']}", flush=True)
            for x in row.get("log_tail", [])[-3:]:
                print(f"    | {x}", flush=True)


def longest_search(a, runner: Runner, model: str, family: str, start: int, rows: list,
                   save) -> dict:
    """Double T until a run fails or the next one can't fit; see the module docstring."""
    T, best, prev_step, stop = start, None, None, None
    while stop is None:
        if T > a.longest_max:
            stop = f"reached --longest-max {fmt_size(a.longest_max)}"
            break
        spec = longest_spec(a, model, family, T)
        if best is not None and a.budget:
            # a run costs its start-up plus steps × step time, the step time growing with T by
            # the last measured ratio, clamped to [2, 4] (linear to quadratic); before there is
            # one, by the family's attention cost (softmax and hybrid: quadratic)
            growth = (min(max(best["step_time_s"] / prev_step, 2.0), 4.0) if prev_step
                      else FIRST_GROWTH.get(family, 4.0))
            start_up = max(best["wall_s"] - best["steps_done"] * best["step_time_s"], 0.0)
            need = start_up + a.longest_steps * best["step_time_s"] * growth
            if need > runner.left() - a.reserve_s:
                stop = (f"budget: T={fmt_size(T)} predicted {need:.0f} s > "
                        f"{max(runner.left() - a.reserve_s, 0):.0f} s left")
                break
        row = runner.run(spec, timeout=a.longest_timeout)
        row["trained"] = loss_falls(row, a.longest_steps)
        rows.append(row)
        save()
        if row["status"] == "skipped":
            stop = row["reason"]
        elif not row["trained"]:
            why = row["reason"] or (f"{row.get('steps_done', 0)} steps, losses "
                                    f"{[round(x, 3) for x in row.get('losses') or []]} not falling")
            stop = f"{row['status']} at T={fmt_size(T)}: {why}"
        else:
            prev_step = best["step_time_s"] if best else None
            best = row
            T *= 2
    return dict(model=model, family=family, start=start,
                longest_T=best["T"] if best else None,
                tokens_per_s=best.get("tokens_per_s") if best else None,
                peak_mem_gb=best.get("peak_mem_gb") if best else None,
                losses=best.get("losses") if best else None, stopped_by=stop)


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="350m", help="configs/model names, comma list (350m,1b)")
    ap.add_argument("--families", default="sdpa,flash,lightning,moba,nsa,hybrid",
                    help=f"comma list of {', '.join(FAMILIES)}")
    ap.add_argument("--seqlens", default="2k,8k,32k,128k", help="comma list of T (8192, 8k, 1M)")
    ap.add_argument("--tokens", default="32768", help="tokens per optimizer step (default 32768)")
    ap.add_argument("--micro-tokens", default="32768",
                    help="cap on tokens per micro-batch: micro_batch <= this / T rows "
                         "(lower it for 1b)")
    ap.add_argument("--ac-from", default="64k", help="activation checkpointing for T >= this")
    ap.add_argument("--compile", default="false", help="trainer.compile values, a list: false,true")
    ap.add_argument("--doc-mask", default="false",
                    help="data.document_mask values for ours, a list (false: like HF, which "
                         "has none)")
    ap.add_argument("--no-hf", dest="hf", action="store_false", help="skip the HF Llama anchor")
    ap.add_argument("--hf-compile", default="false", help="compile the HF anchor's layers: a list")
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps per run")
    ap.add_argument("--steps-long", type=int, default=4,
                    help="steps per run with activation checkpointing (T >= --ac-from)")
    ap.add_argument("--warmup", type=int, default=2,
                    help="first steps left out of the steady state (warm-up, compile)")
    ap.add_argument("--log-every", type=int, default=1, help="trainer.log_every")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu", "auto"])
    ap.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="trainer.peak_tflops for MFU (default: train.py's table of known cards)")
    ap.add_argument("--max-bytes", default=None, help="data.max_bytes for every run")
    ap.add_argument("--autotune", action="store_true",
                    help="let the flash/linear autotuners run (about a minute per new shape)")
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                    help="extra train.py override for every run of ours (repeatable)")
    ap.add_argument("--run-timeout", type=float, default=180, help="seconds per run")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for the whole benchmark: runs that no longer fit are recorded as "
                         "skipped, each run's timeout is cut to what is left")
    ap.add_argument("--reserve-s", type=float, default=10,
                    help="seconds of --budget kept for writing the outputs")
    ap.add_argument("--min-run-s", type=float, default=25,
                    help="skip a run when less than this is left of --budget")
    ap.add_argument("--longest", default="",
                    help="families (and hf) for the longest-T search, e.g. flash,lightning:512k")
    ap.add_argument("--longest-only", action="store_true", help="skip the sweep")
    ap.add_argument("--longest-start", default="128k", help="first T of the longest search")
    ap.add_argument("--longest-max", default="16M", help="stop the longest search above this T")
    ap.add_argument("--longest-steps", type=int, default=3,
                    help="steps a longest run must train (finite, falling loss)")
    ap.add_argument("--longest-timeout", type=float, default=420, help="seconds per longest run")
    ap.add_argument("--longest-compile", action="store_true",
                    help="trainer.compile in longest runs")
    ap.add_argument("--longest-override", action="append", default=[], metavar="KEY=VALUE",
                    help="extra train.py override for longest runs (e.g. trainer.ac_offload=true)")
    ap.add_argument("--tail-lines", type=int, default=15, help="log lines kept for a failed run")
    ap.add_argument("--work-dir", default=None,
                    help="run folders (default: a new temporary folder; never under --out, whose "
                         "files the device call returns)")
    ap.add_argument("--commit", default=None, help="git commit to record (default: git rev-parse)")
    ap.add_argument("--out", default=os.environ.get("OUT") or "bench_out")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    ap.add_argument("--replot", metavar="JSON",
                    help="rewrite bench_train.md/.png in --out from a bench_train.json")
    a = ap.parse_args(argv)

    a.models = [m.strip() for m in a.models.split(",") if m.strip()]
    for m in a.models:
        if not (ROOT / "configs" / "model" / f"{m}.yaml").exists():
            valid = sorted(p.stem for p in (ROOT / "configs" / "model").glob("*.yaml"))
            ap.error(f"--models: no configs/model/{m}.yaml; valid: {', '.join(valid)}")
    a.families = parse_families(a.families, "--families")
    a.longest = parse_families(a.longest, "--longest", allow_hf=True, with_start=True)
    a.seqlens = sorted(set(parse_sizes(a.seqlens, "--seqlens")))
    a.tokens = parse_size(a.tokens, "--tokens")
    a.micro_tokens = parse_size(a.micro_tokens, "--micro-tokens")
    a.ac_from = parse_size(a.ac_from, "--ac-from")
    a.longest_start = parse_size(a.longest_start, "--longest-start")
    a.longest_max = parse_size(a.longest_max, "--longest-max")
    a.max_bytes = parse_size(a.max_bytes, "--max-bytes") if a.max_bytes else None
    a.compile = parse_bools(a.compile, "--compile")
    a.hf_compile = parse_bools(a.hf_compile, "--hf-compile")
    a.doc_mask = parse_bools(a.doc_mask, "--doc-mask")
    for flag in ("steps", "steps_long", "log_every", "longest_steps"):
        if getattr(a, flag) <= 0:
            ap.error(f"--{flag.replace('_', '-')}={getattr(a, flag)} must be positive")
    if not 1 <= a.warmup < min(a.steps, a.steps_long):
        ap.error(f"--warmup={a.warmup} must be at least 1 (the first step compiles) and below "
                 f"--steps={a.steps} and --steps-long={a.steps_long}, so a steady window is left")
    if a.longest_steps < 2:
        ap.error(f"--longest-steps={a.longest_steps} must be >= 2 to see the loss fall")
    if a.longest_only and not a.longest:
        ap.error("--longest-only needs --longest FAMILIES")
    for o in a.override + a.longest_override:
        if "=" not in o:
            ap.error(f"--override/--longest-override {o!r} must be KEY=VALUE (a train.py override)")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    out = Path(a.out)
    if a.replot:
        d = json.loads(Path(a.replot).read_text())
        print(write_outputs(out, d["meta"], d["rows"], d.get("longest", [])))
        return 0
    specs = [] if a.longest_only else plan_sweep(a)
    if a.dry_run:
        work = Path(a.work_dir or "<work-dir>")
        env = run_env(a)
        print("# environment: " + " ".join(f"{k}={env[k]}" for k in AUTOTUNE_ENV if k in env))
        for s in specs:
            print(shlex.join(command(a, s, work / run_name(s))))
        for fam, start in a.longest:
            s = longest_spec(a, a.models[0], fam, start or a.longest_start)
            print(f"# longest {fam}: T doubles from {fmt_size(s['T'])} to at most "
                  f"{fmt_size(a.longest_max)}, first:")
            print(shlex.join(command(a, s, work / run_name(s))))
        return 0

    runner = Runner(a)
    meta = build_meta(a, runner.env)
    meta["work_dir"] = str(runner.work)
    rows: list[dict] = []
    longest: list[dict] = []
    print(f"bench_train: {len(specs)} sweep runs"
          + (f" + longest search for {', '.join(f for f, _ in a.longest)}" if a.longest else "")
          + f"; {meta['card']}; run folders in {runner.work}", flush=True)

    def save():  # after every run: a call cut off by its time limit keeps what it measured
        write_outputs(out, meta, rows, longest, png=False)

    for s in specs:
        rows.append(runner.run(s, total=len(specs)))
        save()
    for model in a.models:
        for fam, start in a.longest:
            longest.append(longest_search(a, runner, model, fam, start or a.longest_start,
                                          rows, save))
            save()
    md = write_outputs(out, meta, rows, longest)
    print(f"\nwrote {out / 'bench_train.json'}, {out / 'bench_train.md'}"
          + ("" if (out / "bench_train.png").exists() else " (no PNG)")
          + f"; {time.monotonic() - runner.t0:.0f} s\n", flush=True)
    print(md, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
