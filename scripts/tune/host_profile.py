#!/usr/bin/env python
"""Where the host's time per attention call goes: cProfile over back-to-back forward + backward
calls enqueued behind a sleeping GPU (so no call waits for the device), after a warm-up.

    python3 scripts/tune/host_profile.py --family moba [--seqlen 16384] [--calls 20] --out OUT

Shapes as scripts/bench/ab_kernels.py's 16k cases: flash (causal, GQA 16 / 4, D 128), moba
(16 / 4 heads, block 512, top-3), nsa (64 / 4 heads). Prints the host ms per call and the
functions with the most own time and the most cumulative time; writes host_profile_<family>.txt
into --out.
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


def layer(family: str, T: int):
    """(fn, inputs): one layer call of the family and its differentiable inputs."""
    dev, bf = "cuda", torch.bfloat16

    def randn(*shape):
        return torch.randn(*shape, device=dev, dtype=bf).requires_grad_()
    if family == "flash":
        from attn.flash import flash_attn
        q, k, v = randn(1, T, 16, 128), randn(1, T, 4, 128), randn(1, T, 4, 128)
        return (lambda: flash_attn(q, k, v)), (q, k, v)
    if family == "moba":
        from attn.moba import moba_attn
        q, k, v = randn(1, T, 16, 128), randn(1, T, 4, 128), randn(1, T, 4, 128)
        return (lambda: moba_attn(q, k, v, block_size=512, topk=3)), (q, k, v)
    from attn.nsa import nsa_attn
    q, k, v = randn(1, T, 64, 128), randn(1, T, 4, 128), randn(1, T, 4, 128)
    tc = (T - 32) // 16 + 1
    kc, vc = randn(1, tc, 4, 128), randn(1, tc, 4, 128)
    g = [torch.rand(1, T, 64, device=dev, dtype=bf).requires_grad_() for _ in range(3)]
    return (lambda: nsa_attn(q, k, v, kc, vc, *g, gates_nonneg=True)), (q, k, v, kc, vc, *g)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--family", default="moba", choices=["flash", "moba", "nsa"])
    ap.add_argument("--seqlen", type=int, default=16384)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    a = ap.parse_args(argv)
    fn, inputs = layer(a.family, a.seqlen)

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
    buf.write(f"{a.family} T={a.seqlen}: host {host_ms:.3f} ms per fwd+bwd (profiled)\n")
    for key in ("tottime", "cumulative"):
        pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(a.top)
    os.makedirs(a.out, exist_ok=True)
    Path(a.out, f"host_profile_{a.family}.txt").write_text(buf.getvalue())
    print(buf.getvalue()[:12000])


if __name__ == "__main__":
    main()
