"""A/B of checkouts' attention kernels in one device run (a restructuring must not move them).

    python3 scripts/bench/ab_kernels.py old=<old checkout> new=. [more=<path> ...] --rounds 3 --out $OUT
    python3 scripts/bench/ab_kernels.py plain=.@FLASH_FWD_AHEAD=0 ahead=.@FLASH_FWD_AHEAD=1 --cases flash,flash64 \
        --mode fwd --rounds 5 --out $OUT             # one checkout, two settings of a switch

The first checkout is the baseline. Each round times every case once per checkout, in order,
each in a fresh process that imports `attn` from that checkout (all are packages named `attn`,
so one process cannot hold two; alternating rounds cancel clock drift). Before the rounds, one
untimed pass per checkout runs concurrently so the checkouts' kernels compile in parallel on the
host's cores (Triton's cache is keyed by kernel source, so identical kernels compile once).
A checkout `NAME=PATH@VAR=VALUE@...` runs with those environment variables set (an A/B of a
switch in one checkout). Per case and checkout: the median over rounds of triton's do_bench median
of back-to-back forward + backward calls (`--mode fwd`: forward only, under no_grad), and the
host's time per call (enqueued behind a sleeping GPU: a case whose host time nears its GPU time
is launch-bound). Cases (scripts/bench/layer_cases.py, shared with scripts/tune/host_profile.py):
flash (causal, GQA 16/4, D 128), flash64 (16 heads, D 64: the 350m model's layer), lightning
(batch 4), MoBA, NSA (64 / 4 heads) at 16k tokens per sequence; on request moba64k (16 / 16
heads: bench_moba.py's layer), moba64k_gqa (16 / 4), nsa64k and nsa64k_b64 (fla's geometry) at
64k;
bf16, autotuning off (FLASH_AUTOTUNE=0, LINEAR_AUTOTUNE=0: the default configs).
Writes <out>/ab_kernels.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CASES = ("flash", "lightning", "moba", "nsa")  # default; flash64, moba64k(_gqa), nsa64k(_b64)
# on request

# one process: import attn from sys.argv[1], time every case, print {case: ms} as JSON
WORKER = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
sys.path.insert(1, sys.argv[5])  # scripts/bench: layer_cases.py
import torch
from triton.testing import do_bench
from layer_cases import case
torch.manual_seed(0)
warm_only = sys.argv[3] == "warm"
fwd_only = sys.argv[4] == "fwd"
out, host = {}, {}
for name in sys.argv[2].split(","):
    fn, inputs = case(name)
    def step():
        if fwd_only:
            with torch.no_grad():
                fn()
        else:
            o = fn()
            o.backward(torch.ones_like(o))
    if warm_only:
        step()
        continue
    # back-to-back calls (the host queues ahead of the GPU), median of the rep window: timing
    # single synchronized calls counted the host's launch time too (0.95 ms for a 0.75 ms
    # forward, +-10 % from call to call)
    out[name] = do_bench(step, warmup=25, rep=150, grad_to_none=inputs, return_mode="median")
    # the host's time per call: the GPU is held busy by a sleep kernel, so enqueuing 10 calls
    # measures only Python, autograd and launch work (a host sync inside the op shows as ~1 s)
    torch.cuda.synchronize()
    torch.cuda._sleep(2 ** 31)  # ~1 s of GPU clock cycles, longer than 10 enqueued calls
    t0 = time.perf_counter()
    for _ in range(10):
        step()
    host[name] = (time.perf_counter() - t0) * 100  # ms per call
    torch.cuda.synchronize()
print("AB_RESULT " + json.dumps({"gpu": out, "host": host}))
"""


def worker(spec: str, cases: list[str], mode: str, timed: str) -> subprocess.Popen:
    root, *settings = spec.split("@")
    env = dict(os.environ, FLASH_AUTOTUNE="0", LINEAR_AUTOTUNE="0")
    env.pop("TRITON_INTERPRET", None)
    env.update(kv.split("=", 1) for kv in settings)
    return subprocess.Popen([sys.executable, "-c", WORKER, str(Path(root).resolve()),
                             ",".join(cases), mode, timed, str(Path(__file__).resolve().parent)],
                            stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def result(name: str, proc: subprocess.Popen) -> dict:
    stdout, stderr = proc.communicate(timeout=900)
    line = next((l for l in stdout.splitlines() if l.startswith("AB_RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{name}: no result (exit {proc.returncode})\n{stderr[-3000:]}")
    return json.loads(line[len("AB_RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkouts", nargs="+", help="NAME=PATH[@VAR=VALUE...], baseline first")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--mode", default="fwdbwd", choices=["fwdbwd", "fwd"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="bench_out")
    a = ap.parse_args()
    cases = a.cases.split(",")
    roots = dict(c.split("=", 1) for c in a.checkouts)
    if len(roots) < 2 or any(not Path(p.split("@")[0], "attn").is_dir() for p in roots.values()):
        ap.error("give at least two NAME=PATH checkouts, each with an attn/ package")
    if any("=" not in kv for p in roots.values() for kv in p.split("@")[1:]):
        ap.error("settings after a checkout's path are @VAR=VALUE")
    warm = {name: worker(root, cases, "warm", a.mode) for name, root in roots.items()}
    for name, proc in warm.items():
        result(name, proc)
    print("compiled", flush=True)
    runs = {name: [] for name in roots}
    host = {name: [] for name in roots}
    for r in range(a.rounds):
        for name, root in roots.items():
            res = result(name, worker(root, cases, "time", a.mode))
            runs[name].append(res["gpu"])
            host[name].append(res["host"])
            print(f"round {r + 1} {name}: {res['gpu']} host {res['host']}", flush=True)
    med = {name: {c: statistics.median(run[c] for run in runs[name]) for c in cases}
           for name in runs}
    host_med = {name: {c: statistics.median(run[c] for run in host[name]) for c in cases}
                for name in runs}
    base, *others = roots
    mode = "fwd+bwd" if a.mode == "fwdbwd" else "fwd"
    rows = [f"| case (bf16, {mode}; 16k, 64k where named) | "
            + " | ".join(f"{n} ms" for n in roots)
            + "".join(f" | {n} / {base}" for n in others)
            + "".join(f" | {n} host ms" for n in roots) + " |",
            "|---" * (2 * len(roots) + len(others) + 1) + "|"]
    rows += [f"| {c} | " + " | ".join(f"{med[n][c]:.3f}" for n in roots)
             + "".join(f" | {med[n][c] / med[base][c]:.3f}" for n in others)
             + "".join(f" | {host_med[n][c]:.3f}" for n in roots) + " |"
             for c in cases]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ab_kernels.json").write_text(json.dumps({"checkouts": roots, "mode": a.mode,
                                                     "runs": runs, "median_ms": med,
                                                     "host_runs": host,
                                                     "host_median_ms": host_med}, indent=1))
    (out / "ab_kernels.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
