#!/usr/bin/env python
"""Sweep launch configs of the flash kernels one kernel at a time, split the backward's time by
kernel, and measure the FP8 forward option (time and error). GPU only; prints tables and writes
flash_tune.json into --out.

    python scripts/flash_tune.py --out OUT [--T 16384] [--tokens 32768] [--H 16] [--kv-heads H]
        [--window W] [--kernels fwd,dkdv,dq] [--no-fp8]

--window / --kv-heads sweep the sliding-window case (NSA's window branch: --T 65536 --tokens 65536
--H 64 --kv-heads 4 --window 512); TFLOP/s then count the visible pairs only.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from attn.flash import common, flash_bwd, flash_fwd  # noqa: E402
from attn.flash.op import flash_fwd_fp8, quantize_fp8  # noqa: E402
from attn.flash.ref import flash_attn_ref  # noqa: E402

# candidates beyond the autotune lists, D = 128 (ptxas: * = spills a little)
CANDIDATES = {
    "fwd": [(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (128, 128, 8, 3), (128, 32, 8, 3),
            (64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 8, 2)],
    "dkdv": [(32, 64, 4, 3), (32, 64, 4, 2), (32, 64, 4, 4), (32, 128, 8, 3), (16, 128, 8, 3),
             (64, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3), (16, 64, 4, 3), (32, 32, 4, 3),
             (64, 128, 8, 2)],
    "dq": [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3), (64, 64, 4, 4),
           (64, 32, 4, 3), (64, 64, 8, 3), (128, 128, 8, 2)],
}


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main():
    from triton.testing import do_bench
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=16384)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--H", type=int, default=16)
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--out", default=os.environ.get("OUT", "tune_out"))
    ap.add_argument("--kernels", default="fwd,dkdv,dq")
    ap.add_argument("--kv-heads", type=int, default=None, help="default: --H")
    ap.add_argument("--window", type=int, default=None)
    ap.add_argument("--no-fp8", action="store_true", help="skip the FP8 forward measurement")
    a = ap.parse_args()
    T, H, D, W = a.T, a.H, a.D, a.window
    Hkv = a.kv_heads or H
    B = max(a.tokens // T, 1)
    # visible (query, key) pairs: T²/2 causal, Σ_t min(t + 1, W) with a window
    pairs = T * T / 2 if W is None else sum(min(t + 1, W) for t in range(T))
    fl = 4.0 * B * H * pairs * D
    torch.manual_seed(0)
    q, do = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    k, v = (torch.randn(B, T, Hkv, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    res = dict(B=B, T=T, H=H, Hkv=Hkv, D=D, window=W, sweeps={})
    bench = lambda f: do_bench(f, warmup=25, rep=150, return_mode="median")  # noqa: E731
    o, lse = flash_fwd(q, k, v, window=W)
    best = {}
    for kind in a.kernels.split(","):
        rows = []
        for cfg in CANDIDATES[kind]:
            common.OVERRIDE[kind] = cfg
            try:
                if kind == "fwd":
                    ms = bench(lambda: flash_fwd(q, k, v, window=W))
                else:
                    ms = bench(lambda: flash_bwd(do, q, k, v, o, lse, window=W))
            except Exception as e:  # out of resources etc.
                print(f"{kind} {cfg}: {type(e).__name__}: {str(e)[:80]}")
                continue
            rows.append((cfg, ms))
            print(f"{kind:5s} BM={cfg[0]:3d} BN={cfg[1]:3d} w={cfg[2]} s={cfg[3]}: {ms:7.3f} ms"
                  + (f"  {fl / ms / 1e9:5.0f} TFLOP/s" if kind == "fwd" else "  (whole bwd)"),
                  flush=True)
        best[kind] = min(rows, key=lambda r: r[1])[0]
        common.OVERRIDE[kind] = best[kind]
        res["sweeps"][kind] = [dict(cfg=c, ms=m) for c, m in rows]
    print("best:", best)
    res["best"] = best

    # backward split by kernel (profiler), best configs
    from torch.profiler import ProfilerActivity, profile
    flash_bwd(do, q, k, v, o, lse, window=W)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            flash_fwd(q, k, v, window=W)
            flash_bwd(do, q, k, v, o, lse, window=W)
        torch.cuda.synchronize()
    split = {}
    for ev in prof.key_averages():
        if any(n in ev.key for n in ("_fwd_kernel", "_dkdv_kernel", "_dq_kernel",
                                     "_bwd_preprocess")):
            t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
            split[ev.key] = t / 5 / 1e3
    print("per-kernel ms:", {k_: round(v_, 3) for k_, v_ in split.items()})
    res["split_ms"] = split
    os.makedirs(a.out, exist_ok=True)
    if a.no_fp8:
        with open(os.path.join(a.out, "flash_tune.json"), "w") as f:
            json.dump(res, f, indent=1)
        return

    # FP8 forward: time (with and without the quantization passes) and error vs float64
    common.OVERRIDE.clear()
    q8, qs = quantize_fp8(q)
    k8, ks = quantize_fp8(k)
    from attn.flash.fwd import fwd_triton
    t_bf16 = bench(lambda: flash_fwd(q, k, v, window=W))
    t_fp8 = bench(lambda: fwd_triton(q8, k8, v, D ** -0.5, None, 0, None, q_scale=qs, k_scale=ks))
    t_fp8_q = bench(lambda: flash_fwd_fp8(q, k, v))
    fp8 = dict(ms_bf16=t_bf16, ms_fp8_kernel=t_fp8, ms_fp8_with_quant=t_fp8_q,
               tflops_bf16=fl / t_bf16 / 1e9, tflops_fp8_kernel=fl / t_fp8 / 1e9)
    qs_, ks_, vs_ = (t[:1, :4096, :4].contiguous() for t in (q, k, v))
    exact, lse64 = flash_attn_ref(qs_.double(), ks_.double(), vs_.double())
    o16, _ = flash_fwd(qs_, ks_, vs_)
    o8, _ = flash_fwd_fp8(qs_, ks_, vs_)
    r16, _ = flash_attn_ref(qs_, ks_, vs_)
    fp8.update(err_bf16_kernel=rel(o16, exact), err_fp8=rel(o8, exact),
               err_ref_bf16=rel(r16, exact))
    print("fp8:", {k_: round(v_, 5) for k_, v_ in fp8.items()})
    res["fp8"] = fp8
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "flash_tune.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
