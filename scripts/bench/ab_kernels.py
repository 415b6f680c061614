"""A/B of two checkouts' attention kernels in one device run (a restructuring must not move them).

    python3 scripts/bench/ab_kernels.py --a <old checkout> --b . --rounds 3 --out $OUT

Each round times every case once per checkout, A then B, each in a fresh process that imports
`attn` from that checkout (both are packages named `attn`, so one process cannot hold both;
alternating rounds cancel clock drift). Triton's cache is keyed by kernel source, so identical
kernels compile once. Per case and checkout: the median over rounds of the median forward +
backward time (CUDA events, after warm-up). Cases: flash (causal, GQA), lightning, MoBA, NSA at
16k tokens, bf16, autotuning off (FLASH_AUTOTUNE=0, LINEAR_AUTOTUNE=0: the default configs).
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

CASES = ("flash", "lightning", "moba", "nsa")

# one process: import attn from sys.argv[1], time every case, print {case: ms} as JSON
WORKER = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import torch
torch.manual_seed(0)
dev, bf = "cuda", torch.bfloat16
T, H, HKV, D = 16384, 16, 4, 128
def randn(*shape, grad=True):
    return torch.randn(*shape, device=dev, dtype=bf).requires_grad_(grad)
def case(name):
    if name == "flash":
        from attn.flash import flash_attn
        q, k, v = randn(1, T, H, D), randn(1, T, HKV, D), randn(1, T, HKV, D)
        return lambda: flash_attn(q, k, v), (q, k, v)
    if name == "lightning":
        from attn.lightning import lightning_attn
        q, k, v = (randn(1, T, H, D) for _ in range(3))
        slopes = torch.linspace(0.01, 0.5, H, device=dev)
        return lambda: lightning_attn(q, k, v, slopes)[0], (q, k, v)
    if name == "moba":
        from attn.moba import moba_attn
        q, k, v = randn(1, T, H, D), randn(1, T, HKV, D), randn(1, T, HKV, D)
        return lambda: moba_attn(q, k, v, block_size=512, topk=3), (q, k, v)
    from attn.nsa import nsa_attn
    q, k, v = randn(1, T, 64, D), randn(1, T, HKV, D), randn(1, T, HKV, D)
    tc = (T - 32) // 16 + 1
    kc, vc = randn(1, tc, HKV, D), randn(1, tc, HKV, D)
    g = [torch.rand(1, T, 64, device=dev, dtype=bf).requires_grad_() for _ in range(3)]
    return (lambda: nsa_attn(q, k, v, kc, vc, *g, gates_nonneg=True)), (q, k, v, kc, vc, *g)
out = {}
for name in sys.argv[2].split(","):
    fn, inputs = case(name)
    do = None
    def step():
        o = fn()
        o.backward(torch.ones_like(o) if do is None else do)
    for _ in range(3):
        step()
    times = []
    for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); step(); b.record(); torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    out[name] = sorted(times)[len(times) // 2]
print("AB_RESULT " + json.dumps(out))
"""


def run_once(root: str, cases: list[str]) -> dict:
    env = dict(os.environ, FLASH_AUTOTUNE="0", LINEAR_AUTOTUNE="0")
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-c", WORKER, str(Path(root).resolve()), ",".join(cases)],
                       capture_output=True, text=True, env=env, timeout=900)
    line = next((l for l in r.stdout.splitlines() if l.startswith("AB_RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{root}: no result (exit {r.returncode})\n{r.stderr[-3000:]}")
    return json.loads(line[len("AB_RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", required=True, help="checkout A (before)")
    ap.add_argument("--b", default=".", help="checkout B (after)")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="bench_out")
    a = ap.parse_args()
    cases = a.cases.split(",")
    runs = {"A": [], "B": []}
    for r in range(a.rounds):
        for side, root in (("A", a.a), ("B", a.b)):
            runs[side].append(run_once(root, cases))
            print(f"round {r + 1} {side}: {runs[side][-1]}", flush=True)
    med = {side: {c: statistics.median(run[c] for run in runs[side]) for c in cases}
           for side in runs}
    rows = ["| case (16k, bf16, fwd+bwd) | A ms | B ms | B / A |", "|---|---|---|---|"]
    rows += [f"| {c} | {med['A'][c]:.3f} | {med['B'][c]:.3f} | {med['B'][c] / med['A'][c]:.3f} |"
             for c in cases]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ab_kernels.json").write_text(json.dumps({"a": a.a, "b": a.b, "runs": runs,
                                                     "median_ms": med}, indent=1))
    (out / "ab_kernels.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
