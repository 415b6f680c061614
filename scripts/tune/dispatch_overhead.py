#!/usr/bin/env python
"""Host time per attention fwd+bwd spent in dispatch: a custom op with registered autograd (what
compiled code calls) against attn/common/customop.py's eager path around the same bodies.

    python3 scripts/tune/dispatch_overhead.py [--calls 2000] [--rounds 3] --out OUT

The bodies only allocate their outputs (no kernels), so the difference is the dispatcher's
(schema binding, the autograd kernel, output alias checks) against an autograd.Function's. The
op has flash's signature (q, k, v, scale, cu_seqlens, q_offset -> o, lse). CPU tensors; prints
the median µs per fwd+bwd of each path and writes dispatch_overhead.json / .md into --out.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "bench"))  # harness.py
from attn.common.customop import autograd_op_or_body, op_or_body  # noqa: E402
from harness import run_meta, write_report  # noqa: E402


def fwd_body(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
             cu_seqlens: Optional[torch.Tensor], q_offset: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


def bwd_body(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             o: torch.Tensor, lse: torch.Tensor, scale: float,
             cu_seqlens: Optional[torch.Tensor], q_offset: int
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


fwd_op = torch.library.custom_op("dispatch_overhead::fwd", mutates_args=())(fwd_body)
bwd_op = torch.library.custom_op("dispatch_overhead::bwd", mutates_args=())(bwd_body)


def setup(ctx, inputs, output):
    q, k, v, scale, cu_seqlens, q_offset = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, cu_seqlens)
    ctx.args = (scale, q_offset)
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)


def backward_with(bwd):
    def backward(ctx, do, _dlse):
        q, k, v, o, lse, cu_seqlens = ctx.saved_tensors
        scale, q_offset = ctx.args
        return (*bwd(do, q, k, v, o, lse, scale, cu_seqlens, q_offset), None, None, None)
    return backward


fwd_op.register_autograd(backward_with(bwd_op), setup_context=setup)
PATHS = {"custom op": fwd_op,
         "eager (customop.py)": autograd_op_or_body(fwd_op, fwd_body, setup,
                                                    backward_with(op_or_body(bwd_op, bwd_body)))}


def us_per_call(fn, calls: int) -> float:
    q, k, v = (torch.randn(1, 8, 2, 4, requires_grad=True) for _ in range(3))
    do = torch.randn(1, 8, 2, 4)
    t = time.perf_counter()
    for _ in range(calls):
        o, _ = fn(q, k, v, 0.5, None, 0)
        torch.autograd.grad(o, (q, k, v), do)
    return (time.perf_counter() - t) / calls * 1e6


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    a = ap.parse_args(argv)
    runs = {name: [] for name in PATHS}
    for name, fn in PATHS.items():
        us_per_call(fn, a.calls // 10)  # warm-up
    for _ in range(a.rounds):  # alternating rounds
        for name, fn in PATHS.items():
            runs[name].append(us_per_call(fn, a.calls))
    med = {name: statistics.median(r) for name, r in runs.items()}
    md = "| path | µs per fwd+bwd (median) |\n|---|---:|\n" + "".join(
        f"| {name} | {us:.1f} |\n" for name, us in med.items())
    write_report(a.out, "dispatch_overhead",
                 dict(meta=run_meta(device="cpu", calls=a.calls, rounds=a.rounds), runs=runs,
                      median_us=med), md, quiet=False)


if __name__ == "__main__":
    main()
