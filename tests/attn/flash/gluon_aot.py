"""Compile the Gluon flash forward (attn/flash/fwd_gluon.py) for sm_90a without a GPU: `python
gluon_aot.py` prints registers, stack and shared memory of each GLUON_CFG entry and of the
64-key-block variants tune_flash.py sweeps, and exits non-zero when one fails to compile, spills
or exceeds 227 KB of shared memory. Run by
tests/attn/flash/test_fwd_gluon.py in a subprocess (Gluon kernels are compiled, never
interpreted); uses the ptxas / cuobjdump that ship with the triton wheel."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.runtime.jit import mangle_type

from attn.flash import fwd_gluon as G

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
SMEM_MAX = 227 * 1024  # sm_90's shared memory per block


def compile_cfg(d: int, bm: int, bn: int, stages: int, dtype=gl.bfloat16) -> dict:
    # descriptor types as the launcher mangles them (host tensors stand in for device ones)
    t = torch.empty(1024, 4 * d, dtype=torch.bfloat16 if dtype == gl.bfloat16 else torch.float16)
    half = G.HALF_M.value
    q_desc = TensorDescriptor(t, list(t.shape), list(t.stride()), [half, d],
                              gl.NVMMASharedLayout.get_default_for([half, d], dtype))
    kv_desc = TensorDescriptor(t, list(t.shape), list(t.stride()), [bn, d],
                               gl.NVMMASharedLayout.get_default_for([bn, d], dtype))
    sig = {"q_desc": mangle_type(q_desc), "k_desc": mangle_type(kv_desc),
           "v_desc": mangle_type(kv_desc), "o_desc": mangle_type(q_desc), "LSE": "*fp32",
           "SEG": "*i32", "qk_scale": "fp32", "Tq": "i32", "Tk": "i32", "q_offset": "i32",
           "window": "i32", "has_seg": "i32"}
    const = dict(HQ=4, HKV=2, HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, STAGES=stages,
                 CONSUMER_REGS=G.CONSUMER_REGS, PRODUCER_REGS=G.PRODUCER_REGS,
                 num_warps=G.CONSUMER_WARPS.value)
    sig.update({k: "constexpr" for k in const})
    k = triton.compile(GluonASTSource(G._fwd_gluon_kernel, sig, const),
                       target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": G.CONSUMER_WARPS.value})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        res = subprocess.run([os.path.join(BIN, "cuobjdump"), "-res-usage", f.name],
                             capture_output=True, text=True).stdout
        sass = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", f.name],
                              capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", res)
    return dict(regs=int(m.group(1)), stack=int(m.group(2)), smem=k.metadata.shared,
                local_ops=len(re.findall(r"\b(?:STL|LDL)\b", sass)))


def too_big(r: dict) -> bool:
    """Spills beyond one value, or more shared memory than sm_90 has. ptxas spills one value of
    the 128-key configs (8 bytes of stack, a few local loads of one slot), D = 64 with the 3.6
    ptxas, D = 128 with 3.9's; more than that is a register plan gone wrong."""
    return r["stack"] > 8 or r["smem"] > SMEM_MAX


def main() -> int:
    jobs = [(d, *cfg) for d, cfg in G.GLUON_CFG.items()]
    jobs += [(d, bm, 64, 4) for d, (bm, _, _) in G.GLUON_CFG.items()]
    failed = 0
    for d, bm, bn, st in jobs:
        for dt in (gl.bfloat16, gl.float16):
            name = f"D={d} {bm}x{bn} stages={st} {dt}"
            try:
                r = compile_cfg(d, bm, bn, st, dt)
                bad = too_big(r)
                failed += bad
                print(f"{name:40s} {r}{' FAILED: spills or shared memory' if bad else ''}",
                      flush=True)
            except Exception as e:  # report every failure, then exit non-zero
                failed += 1
                print(f"{name:40s} FAILED {type(e).__name__}: {str(e)[:800]}", flush=True)
    return failed


if __name__ == "__main__":
    sys.exit(1 if main() else 0)
