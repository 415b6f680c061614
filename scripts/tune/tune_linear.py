#!/usr/bin/env python
"""Per-pass times of the linear-attention scan (attn/linear/kernels.py) on the GPU.

    python3 scripts/tune/tune_linear.py --out OUT [--shapes 2x16384,1x65536] [--decay]
        [--seg-len 2048]

For each B x T (H = 16, D = 128, bf16): pass 1 (segment states), pass 2 (state scan), pass 3
(chunk outputs), the forward total and the backward total; median ms of triton.testing.do_bench.
Writes linear_parts.json into --out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root


def pass_times(B, T, H, D, decay, warmup, rep):
    from triton.testing import do_bench
    from attn.linear import launch as L
    torch.manual_seed(0)
    q, k, v, do = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) * 0.1
                   for _ in range(4))
    slopes = torch.linspace(0.01, 0.5, H, device="cuda") if decay else None
    lay = L._Layout(B, T, H, None, q.device)
    scale = D ** -0.5
    bench = lambda f: do_bench(f, warmup=warmup, rep=rep)  # noqa: E731
    r = {"pass1": bench(lambda: L._seg_states(k, v, slopes, lay, False, 1.0))}
    st = L._seg_states(k, v, slopes, lay, False, 1.0)
    r["pass2"] = bench(lambda: L._scan(st, None, slopes, lay, False, T))
    r["pass3"] = bench(lambda: L._chunk_out(q, k, v, st, False, slopes, lay, False, scale, scale,
                                            1.0))
    r["fwd"] = bench(lambda: L._fwd_triton(q, k, v, slopes, scale, None, lay))
    _, _, st = L._fwd_triton(q, k, v, slopes, scale, None, lay)
    r["bwd"] = bench(lambda: L._bwd_triton(do, q, k, v, slopes, scale, st, None, lay))
    r["fwd_ns_per_token"] = r["fwd"] * 1e6 / (B * T)
    return r


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="16x2048,8x4096,2x16384,1x65536")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--decay", action="store_true", help="lightning (slopes) instead of linear")
    ap.add_argument("--seg-len", type=int, default=None,
                    help="override attn.linear.kernels.SEG_LEN (tokens per segment)")
    ap.add_argument("--warmup", type=int, default=10, help="ms")
    ap.add_argument("--rep", type=int, default=50, help="ms")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    from attn.linear import kernels as K
    if a.seg_len:
        K.SEG_LEN = a.seg_len
    res = {"meta": {"device": torch.cuda.get_device_name(), "H": a.heads, "D": a.head_dim,
                    "decay": a.decay, "seg_len": K.SEG_LEN}, "passes": {}}
    for shape in a.shapes.split(","):
        B, T = (int(x) for x in shape.split("x"))
        r = pass_times(B, T, a.heads, a.head_dim, a.decay, a.warmup, a.rep)
        res["passes"][shape] = r
        print(shape, json.dumps({k: round(v, 4) for k, v in r.items()}), flush=True)
    name = ("lightning" if a.decay else "linear") + (f"_seg{a.seg_len}" if a.seg_len else "") \
        + "_parts.json"
    with open(os.path.join(a.out, name), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
