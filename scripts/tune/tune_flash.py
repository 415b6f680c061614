#!/usr/bin/env python
"""Launch configs of the flash kernels, two ways:

    python3 scripts/tune/tune_flash.py --out OUT [--T 16384] [--tokens 32768] [--H 16]
        [--kv-heads H] [--window W] [--kernels fwd,dkdv,dq] [--no-fp8]              # GPU
    python3 scripts/tune/tune_flash.py --aot [--dims 64,128,256] [--kernels fwd,dkdv,dq]
        [--dtype bf16|fp32] [--tma] [--ahead]                                       # no GPU

GPU: sweep the candidates below one kernel at a time (each kernel keeps its best before the next is
swept), split the backward's time by kernel, and measure the FP8 forward option (time and error);
`--kernels gluon` times the Gluon forward's (BLOCK_N, STAGES) candidates next to the Triton forward
and `--kernels gluon-dkdv` the Gluon dK/dV kernel's (BLOCK_M, STAGES) next to the Triton dK/dV
(no window); prints tables and writes flash_tune.json into --out. --window / --kv-heads sweep the
sliding-window case (NSA's window branch: --T 65536 --tokens 65536 --H 64 --kv-heads 4 --window
512); TFLOP/s then count the visible pairs only.

--aot: compile every config of the autotune lists for sm_90a with the ptxas that ships with
triton (the newest one it bundles) and report, per config, registers, spills, shared memory and
the load / MMA instructions in the PTX. Costs no device time: run it before sending a config
list to the GPU. Pointer arguments are marked 16-byte aligned, as the JIT specializes them at
launch.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

# compiled kernels in both modes: the CPU tests' interpreter setting would replace them
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

import torch  # noqa: E402

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

# the Gluon forward (fwd_gluon.py, --kernels gluon): (BLOCK_N, STAGES) per head dim, BLOCK_M 128;
# D = 128 with 128-key blocks takes 224 KB (tests/attn/flash/gluon_aot.py compiles the defaults
# and the 64-key variants); D = 64 with 6 stages 213 KB (ptxas, triton 3.6: the same one spilled
# value as 4 stages; 256-key blocks spill 192 bytes, not swept)
GLUON_CANDIDATES = {128: [(128, 3), (64, 3), (64, 4), (64, 5)],
                    64: [(128, 4), (128, 3), (128, 6), (64, 4), (64, 6)]}


# the Gluon dK/dV kernel (bwd_gluon.py, --kernels gluon-dkdv): (BLOCK_M, STAGES), BLOCK_N 128; at
# D = 128 64-query blocks spill 144 bytes (triton 3.6), timed to see what the spill costs
GLUON_DKDV_CANDIDATES = {128: [(32, 6), (32, 4), (64, 4)], 64: [(64, 4), (64, 6), (32, 6)]}


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def gluon_sweep(q, k, v, W, fl, bench):
    """Forward ms of the Gluon kernel per (BLOCK_N, STAGES), with the Triton forward (default
    config) in the same call; window W (None: causal)."""
    from attn.flash import common, flash_fwd
    from attn.flash.fwd_gluon import fwd_gluon
    D = q.shape[-1]
    common.OVERRIDE.pop("fwd", None)
    rows = [dict(cfg="triton", ms=bench(lambda: flash_fwd(q, k, v, window=W)))]
    for bn, st in GLUON_CANDIDATES[D]:
        try:
            rows.append(dict(cfg=[bn, st], ms=bench(
                lambda: fwd_gluon(q, k, v, D ** -0.5, window=W, block_n=bn, stages=st))))
        except Exception as e:  # out of resources etc.
            print(f"gluon {bn} {st}: {type(e).__name__}: {str(e)[:80]}")
    for r in rows:
        print(f"fwd {str(r['cfg']):22s}: {r['ms']:7.3f} ms  {fl / r['ms'] / 1e9:5.0f} TFLOP/s",
              flush=True)
    return rows


def gluon_dkdv_sweep(q, k, v, do, o, lse, fl, bench):
    """dK/dV ms of the Gluon kernel per (BLOCK_M, STAGES), with the Triton dK/dV kernel (default
    config, launched alone through FLASH_BWD's split path minus dQ) in the same call, and the
    largest relative difference of dK, dV between them."""
    from attn.common.softmax import bwd_delta
    from attn.flash import bwd as B
    from attn.flash.bwd_gluon import dkdv_gluon
    D = q.shape[-1]
    scale = D ** -0.5
    delta = bwd_delta(o, do)
    dk_t, dv_t = (torch.empty_like(t) for t in (k, v))

    def triton_dkdv():
        B._launch("dkdv", B._dkdv_tuned, B._dkdv_kernel, B.DKDV_CFGS, B.INTERP_DKDV, k.shape[1],
                  k.shape[0] * k.shape[2],
                  (q, k, v, do, lse, delta, dk_t, dv_t, delta, delta, scale, scale * B.LOG2E_F,
                   0, 0, q.shape[1], k.shape[1], B.common.launch_sms(q.device)),
                  dict(HQ=q.shape[2], HKV=k.shape[2], HEAD_DIM=D, HAS_SEG=False,
                       HAS_WINDOW=False, DOT_PREC=B.dot_precision(q.dtype),
                       TMA=B.use_tma("dkdv", q, do)), "BLOCK_N")
    rows = [dict(cfg="triton", ms=bench(triton_dkdv))]
    for bm, st in GLUON_DKDV_CANDIDATES[D]:
        try:
            ms = bench(lambda: dkdv_gluon(do, q, k, v, lse, delta, scale, None, 0, None,
                                          block_m=bm, stages=st))
            dk, dv = dkdv_gluon(do, q, k, v, lse, delta, scale, None, 0, None, block_m=bm,
                                stages=st)
            rows.append(dict(cfg=[bm, st], ms=ms, err=max(rel(dk, dk_t), rel(dv, dv_t))))
        except Exception as e:  # out of resources etc.
            print(f"gluon dkdv {bm} {st}: {type(e).__name__}: {str(e)[:80]}")
    for r in rows:  # dK/dV: 4 block products per pair, twice the forward's 2
        print(f"dkdv {str(r['cfg']):14s}: {r['ms']:7.3f} ms  {fl * 2 / r['ms'] / 1e9:5.0f} "
              f"TFLOP/s  err {r.get('err', 0):.1e}", flush=True)
    return rows


def sweep(a):
    from triton.testing import do_bench

    from attn.flash import common, flash_bwd, flash_fwd
    from attn.flash.op import flash_fwd_fp8, quantize_fp8
    from attn.flash.ref import flash_attn_ref
    # fwd.py's and bwd.py's configs are tuned here; the gluon sweeps call the Gluon kernels
    common.FWD_IMPL, common.DKDV_IMPL = "triton", "triton"
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
        if kind == "gluon":  # not part of the autotune lists: timed next to the Triton forward
            res["sweeps"]["gluon"] = gluon_sweep(q, k, v, W, fl, bench)
            continue
        if kind == "gluon-dkdv":  # likewise, next to the Triton dK/dV kernel
            res["sweeps"]["gluon-dkdv"] = gluon_dkdv_sweep(q, k, v, do, o, lse, fl, bench)
            continue
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


# ----------------------------------------------------------------------------- --aot
P = "*bf16"  # pointer type of the compiled signatures (--dtype)


def sigs():
    """Argument types of each kernel, in its parameter order."""
    return {
        "fwd": dict(Q=P, K=P, V=P, O=P, LSE="*fp32", SEG_START="*i32", QS="*fp32", KS="*fp32",
                    qk_scale="fp32", q_offset="i32", window="i32", Tq="i32", Tk="i32",
                    n_sm="i32"),
        "dkdv": dict(Q=P, K=P, V=P, DO=P, LSE="*fp32", DELTA="*fp32", DK=P, DV=P,
                     SEG_START="*i32", SEG_END="*i32", scale="fp32", qk_scale="fp32",
                     q_offset="i32", window="i32", Tq="i32", Tk="i32", n_sm="i32"),
        "dq": dict(Q=P, K=P, V=P, DO=P, LSE="*fp32", DELTA="*fp32", DQ=P, SEG_START="*i32",
                   scale="fp32", qk_scale="fp32", q_offset="i32", window="i32", Tq="i32",
                   Tk="i32", n_sm="i32"),
    }


def kernels():
    """name -> (kernel, its autotune config table)."""
    from attn.flash import bwd, fwd
    return {"fwd": (fwd._fwd_kernel, fwd.FWD_CFGS), "dkdv": (bwd._dkdv_kernel, bwd.DKDV_CFGS),
            "dq": (bwd._dq_kernel, bwd.DQ_CFGS)}


def ptxas():
    import triton
    d = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    cands = sorted(glob.glob(os.path.join(d, "ptxas*")), key=len, reverse=True)
    return cands[0]


def aot_check(name, d, cfg, extra):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    fn, _ = kernels()[name]
    sig = sigs()[name]
    bm, bn, w, s = cfg
    attrs = {(i,): [["tt.divisibility", 16]] for i, (n, t) in enumerate(sig.items())
             if t.startswith("*")}
    const = dict(HQ=16, HKV=16, HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, HAS_SEG=False,
                 HAS_WINDOW=False, DOT_PREC="ieee" if P == "*fp32" else "tf32", **extra)
    if name == "fwd":
        const.setdefault("FP8", False)
        const.setdefault("AHEAD", False)
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


def aot(a):
    global P
    P = "*" + a.dtype
    from attn.common.launch import pick_dim
    for name in a.kernels.split(","):
        for d in [int(x) for x in a.dims.split(",")]:
            table = kernels()[name][1]
            for cfg in table[pick_dim(table, d, torch.float32 if a.dtype == "fp32" else None)]:
                extra = {"TMA": True} if a.tma and name != "fwd" else {}
                if a.ahead and name == "fwd":
                    extra = {"AHEAD": True}
                aot_check(name, d, cfg, extra)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--aot", action="store_true", help="compile for sm_90a, no GPU (see above)")
    ap.add_argument("--kernels", default="fwd,dkdv,dq")
    ap.add_argument("--T", type=int, default=16384)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--H", type=int, default=16)
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--out", default=os.environ.get("OUT", "tune_out"))
    ap.add_argument("--kv-heads", type=int, default=None, help="default: --H")
    ap.add_argument("--window", type=int, default=None)
    ap.add_argument("--no-fp8", action="store_true", help="skip the FP8 forward measurement")
    ap.add_argument("--dims", default="64,128,256", help="--aot: head dims")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="--aot: inputs")
    ap.add_argument("--tma", action="store_true", help="--aot: dK/dV and dQ with TMA descriptors")
    ap.add_argument("--ahead", action="store_true",
                    help="--aot: the forward with scores one chunk ahead (FLASH_FWD_AHEAD=1)")
    a = ap.parse_args()
    if a.aot:
        aot(a)
    elif not torch.cuda.is_available():
        sys.exit("tune_flash.py needs a CUDA GPU (or --aot)")
    else:
        sweep(a)


if __name__ == "__main__":
    main()
