#!/usr/bin/env python
"""Where the host's time per attention call goes: cProfile over back-to-back forward + backward
calls enqueued behind a sleeping GPU (so no call waits for the device), after a warm-up.

    python3 scripts/tune/host_profile.py --case moba [--calls 20] --out OUT

Cases: scripts/bench/layer_cases.py (ab_kernels.py's: flash, moba, nsa, ... at 16k). Prints the
host ms per call and the functions with the most own time and the most cumulative time; writes
host_profile_<case>.txt into --out.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "bench"))  # layer_cases.py
from layer_cases import CASES, case  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", default="moba", choices=CASES)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    a = ap.parse_args(argv)
    fn, inputs = case(a.case)

    def step():
        o = fn()
        o.backward(torch.ones_like(o))
        for t in inputs:
            t.grad = None
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda._sleep(2 ** 32)  # ~2 s of GPU clock cycles: every call below only enqueues
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(a.calls):
        step()
    prof.disable()
    host_ms = (time.perf_counter() - t0) * 1e3 / a.calls
    torch.cuda.synchronize()
    buf = io.StringIO()
    buf.write(f"{a.case}: host {host_ms:.3f} ms per fwd+bwd (profiled)\n")
    for key in ("tottime", "cumulative"):
        pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(a.top)
    os.makedirs(a.out, exist_ok=True)
    Path(a.out, f"host_profile_{a.case}.txt").write_text(buf.getvalue())
    print(buf.getvalue()[:12000])


if __name__ == "__main__":
    main()
