#!/usr/bin/env python
"""Compile the flash kernels for sm_90a on a machine without a GPU and report, per config,
registers, spills and shared memory (ptxas -v) and the load / MMA instructions in the PTX.

    python scripts/flash_aot_check.py [--dims 64,128,256] [--kernels fwd,dkdv,dq]

Uses the ptxas that ships with triton (the newest one it bundles). Costs no device time: run it
before sending a config list to the GPU. Pointer arguments are marked 16-byte aligned, as the
JIT specializes them at launch.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from attn.flash import bwd, fwd  # noqa: E402

P = "*bf16"


def sigs():
    return {
        "fwd": dict(Q=P, K=P, V=P, O=P, LSE="*fp32", SEG_START="*i32", QS="*fp32", KS="*fp32",
                    qk_scale="fp32",
                q_offset="i32", window="i32", Tq="i32", Tk="i32", n_sm="i32"),
        "dkdv": dict(Q=P, K=P, V=P, DO=P, LSE="*fp32", DELTA="*fp32", DK=P, DV=P, SEG_START="*i32",
                 SEG_END="*i32", scale="fp32", qk_scale="fp32", q_offset="i32", window="i32",
                 Tq="i32", Tk="i32", n_sm="i32"),
        "dq": dict(Q=P, K=P, V=P, DO=P, LSE="*fp32", DELTA="*fp32", DQ=P, SEG_START="*i32",
               scale="fp32", qk_scale="fp32", q_offset="i32", window="i32", Tq="i32", Tk="i32",
               n_sm="i32"),
    }
KERNELS = {"fwd": (fwd._fwd_kernel, fwd.FWD_CFGS), "dkdv": (bwd._dkdv_kernel, bwd.DKDV_CFGS),
           "dq": (bwd._dq_kernel, bwd.DQ_CFGS)}


def ptxas():
    d = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    cands = sorted(glob.glob(os.path.join(d, "ptxas*")), key=len, reverse=True)
    return cands[0]


def check(name, d, cfg, extra):
    fn, _ = KERNELS[name]
    sig = sigs()[name]
    bm, bn, w, s = cfg
    attrs = {(i,): [["tt.divisibility", 16]] for i, (n, t) in enumerate(sig.items())
             if t.startswith("*")}
    const = dict(HQ=16, HKV=16, HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, HAS_SEG=False,
                 HAS_WINDOW=False, DOT_PREC="ieee" if P == "*fp32" else "tf32", **extra)
    if name == "fwd":
        const.setdefault("FP8", False)
    else:
        const.setdefault("TMA", False)
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": w, "num_stages": s})
    ptx = k.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        open(path, "w").write(ptx)
        rep = subprocess.run([ptxas(), "-arch=sm_90a", "-v", path, "-o", path + ".cubin"],
                             capture_output=True, text=True).stderr
    regs = re.findall(r"Used (\d+) registers", rep)
    spill = re.findall(r"(\d+) bytes spill stores", rep)
    ops = {}
    for m in re.findall(r"cp\.async\.bulk\.tensor|cp\.async\.cg|ld\.global\.v4|ld\.global\.b16|"
                        r"wgmma\.mma_async|mma\.sync", ptx):
        ops[m] = ops.get(m, 0) + 1
    print(f"{name:5s} D={d:3d} BM={bm:3d} BN={bn:3d} warps={w} stages={s}: regs={regs[0]:>3s} "
          f"spill={spill[0]:>5s} B smem={k.metadata.shared // 1024:3d} KB  {ops}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dims", default="64,128,256")
    ap.add_argument("--kernels", default="fwd,dkdv,dq")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--tma", action="store_true", help="dK/dV and dQ with TMA descriptors")
    a = ap.parse_args()
    global P
    P = "*" + a.dtype
    import torch
    from attn.flash.common import pick_dim
    for name in a.kernels.split(","):
        for d in [int(x) for x in a.dims.split(",")]:
            table = KERNELS[name][1]
            for cfg in table[pick_dim(table, d, torch.float32 if a.dtype == "fp32" else None)]:
                check(name, d, cfg, {"TMA": True} if a.tma and name != "fwd" else {})


if __name__ == "__main__":
    main()
