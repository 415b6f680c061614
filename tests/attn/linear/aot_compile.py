"""Compile the Triton kernels for an H100 (sm_90) without a GPU: `python aot_compile.py` prints one
line per kernel variant (registers, spilled bytes, shared memory) and exits non-zero when one
fails. Run by the CPU tests in a subprocess (the kernels must be defined with TRITON_INTERPRET
unset); uses the ptxas/cuobjdump that ship with the triton wheel.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from attn.linear import kernels as K
from attn.linear import launch

TARGET = GPUTarget("cuda", 90, 32)
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _compile(fn, sig, consts, warps, stages):
    # pointers 16-byte aligned, as the launcher specializes them for torch allocations
    attrs = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(sig.values()) if t[0] == "*"}
    k = triton.compile(ASTSource(fn, sig, consts, attrs), target=TARGET,
                       options=dict(num_warps=warps, num_stages=stages))
    regs = spill = None
    if os.path.exists(CUOBJDUMP):
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            res = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True,
                                 text=True).stdout
        m = re.search(r"REG:(\d+) STACK:(\d+)", res)
        if m:
            regs, spill = int(m.group(1)), int(m.group(2))
    return dict(regs=regs, stack=spill, smem=k.metadata.shared)


def chunk_out(D, dtype, BT, BV, warps, stages, rev, decay, varlen):
    sig = {"A_ptr": f"*{dtype}", "B_ptr": f"*{dtype}", "V_ptr": f"*{dtype}", "st_ptr": "*fp32",
           "stride_sa": "i32", "stride_sv": "i32", "O_ptr": f"*{dtype}", "slopes_ptr": "*fp32",
           "seg_tab": "*i32", "T": "i32", "NSEG": "i32", "s_intra": "fp32", "s_inter": "fp32",
           "s_upd": "fp32"}
    consts = dict(H=16, DA=D, DV=D, BV=BV, BT=BT, SEG=K.SEG_LEN, REVERSE=rev, HAS_DECAY=decay,
                  VARLEN=varlen, DOT_PREC="ieee" if dtype == "fp32" else "tf32")
    sig.update({k: "constexpr" for k in consts})
    return _compile(K.chunk_out_kernel, sig, consts, warps, stages)


def seg_state(D, dtype, BA, BV, BT, warps, stages, rev, decay, varlen):
    sig = {"B_ptr": f"*{dtype}", "V_ptr": f"*{dtype}", "slopes_ptr": "*fp32", "out_ptr": "*fp32",
           "seg_tab": "*i32", "T": "i32", "NSEG": "i32", "s_upd": "fp32"}
    consts = dict(H=16, DA=D, DV=D, BA=BA, BV=BV, BT=BT, SEG=K.SEG_LEN, REVERSE=rev,
                  HAS_DECAY=decay, VARLEN=varlen, DOT_PREC="ieee" if dtype == "fp32" else "tf32")
    sig.update({k: "constexpr" for k in consts})
    return _compile(K.seg_state_kernel, sig, consts, warps, stages)


def state_scan(D, rev, decay, varlen, init):
    sig = {"st_ptr": "*fp32", "init_ptr": "*fp32", "final_ptr": "*fp32", "slopes_ptr": "*fp32",
           "seg_tab": "*i32", "doc_seg": "*i32", "T": "i32", "NSEG": "i32"}
    consts = dict(H=16, DA=D, DV=D, BA=launch._SCAN_TILE, BV=launch._SCAN_TILE, SEG=K.SEG_LEN,
                  REVERSE=rev, HAS_DECAY=decay, VARLEN=varlen, HAS_INIT=init)
    sig.update({k: "constexpr" for k in consts})
    return _compile(K.state_scan_kernel, sig, consts, 4, 1)


def main(full: bool):
    bt, bv, w, s = launch._OUT_CFGS[0]
    ba, bv1, bt1, w1, s1 = launch._STATE_CFGS[0]
    jobs = [
        ("chunk_out fwd decay", lambda: chunk_out(128, "bf16", bt, bv, w, s, False, True, False)),
        ("chunk_out rev decay varlen",
         lambda: chunk_out(128, "bf16", bt, bv, w, s, True, True, True)),
        ("chunk_out fwd nodecay",
         lambda: chunk_out(128, "bf16", bt, bv, w, s, False, False, False)),
        ("seg_state rev decay",
         lambda: seg_state(128, "bf16", ba, bv1, bt1, w1, s1, True, True, False)),
        ("state_scan fwd varlen", lambda: state_scan(128, False, True, True, True)),
    ]
    if full:  # every autotune candidate, both directions
        for c in launch._OUT_CFGS:
            for rev in (False, True):
                jobs.append((f"chunk_out {c} rev={rev}",
                             lambda c=c, rev=rev: chunk_out(128, "bf16", *c, rev, True, False)))
        for c in launch._STATE_CFGS:
            jobs.append((f"seg_state {c}",
                         lambda c=c: seg_state(128, "bf16", *c, False, True, False)))
    failed = 0
    for name, job in jobs:
        try:
            print(f"{name:40s} {job()}", flush=True)
        except Exception as e:  # report every failure, then exit non-zero
            failed += 1
            print(f"{name:40s} FAILED {type(e).__name__}: {str(e)[:500]}", flush=True)
    return failed


if __name__ == "__main__":
    sys.exit(1 if main("--full" in sys.argv) else 0)

