#!/usr/bin/env python
"""Attention benchmark harness: every backend, one table.

    python3 scripts/bench/bench_attn.py --out OUT [--backends flash,sdpa_flash,...]
        [--seqlens 4096,...]
    python3 scripts/bench/bench_attn.py --replot OUT/bench_attn.json --out OUT  # no GPU needed

Backends (missing ones are skipped with a note, so later families plug in by existing):
  flash       our FlashAttention (attn.flash.flash_attn; on Hopper the Gluon forward and dK/dV)
  flash_triton the same with the Triton kernels everywhere (FLASH_FWD_IMPL=FLASH_DKDV_IMPL=triton)
  flash_dkdv_triton flash with the Triton dK/dV kernel (FLASH_DKDV_IMPL=triton): its A/B
  flash_plain the Triton forward with its scores-ahead loop off (FLASH_FWD_AHEAD=0)
  sdpa_flash  torch SDPA, FlashAttention-2 backend      sdpa_cudnn  torch SDPA, cuDNN backend
  flex        torch FlexAttention, compiled, causal block mask
  fla         flash-linear-attention parallel_attn (Triton), when importable
  linear, lightning, moba, nsa   our other families' public functions, when present
Shapes: B*T = --tokens (default 32k), H = 16, D = 128, bf16, T in {4k, 16k, 64k}. Times are
medians of triton.testing.do_bench; TFLOP/s use the causal softmax count 4*B*H*T^2*D/2 (x3.5
for forward+backward) for every backend (a softmax-equivalent rate for the non-softmax
families); tokens/s = B*T / time. Writes bench_attn.json, bench_attn.md and bench_attn.png into
--out.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from harness import md_table, require_cuda, run_guarded, run_meta, seq_label, skipped_line, \
    write_report

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------- backends
# Each factory takes (B, T, H, Hkv, D, dtype) and returns (fn, inputs): fn(*inputs) -> o in
# [B, T, H, D] or [B, H, T, D]; inputs that need gradients have requires_grad set.

def _bthd(B, T, H, Hkv, D, dtype):
    q = torch.randn(B, T, H, D, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(B, T, Hkv, D, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(B, T, Hkv, D, device="cuda", dtype=dtype, requires_grad=True)
    return [q, k, v]


def _bhtd(B, T, H, Hkv, D, dtype):
    return [t.detach().transpose(1, 2).contiguous().requires_grad_()
            for t in _bthd(B, T, H, Hkv, D, dtype)]


def make_flash(B, T, H, Hkv, D, dtype):
    from attn.flash import flash_attn
    return flash_attn, _bthd(B, T, H, Hkv, D, dtype)


def make_flash_setting(**settings):
    """Our op with switches of attn/flash/common.py set for the call (restored after it):
    FWD_IMPL="triton" with DKDV_IMPL="triton" is flash_triton, DKDV_IMPL="triton" alone
    flash_dkdv_triton, FWD_IMPL="triton" with FWD_AHEAD=False flash_plain (FLASH_FWD_AHEAD=0)."""
    def make(B, T, H, Hkv, D, dtype):
        from attn.flash import common, flash_attn

        def fn(q, k, v):
            saved = {name: getattr(common, name) for name in settings}
            for name, value in settings.items():
                setattr(common, name, value)
            try:
                return flash_attn(q, k, v)
            finally:
                for name, value in saved.items():
                    setattr(common, name, value)
        return fn, _bthd(B, T, H, Hkv, D, dtype)
    return make


def make_flash_variant(bwd_mode):
    """Our kernel with FLASH_BWD forced (split: dK/dV then dQ launch; fused: one launch)."""
    def make(B, T, H, Hkv, D, dtype):
        from attn.flash import flash_attn

        def fn(q, k, v):
            old = os.environ.get("FLASH_BWD")
            os.environ["FLASH_BWD"] = bwd_mode
            try:
                return _Restore.apply(flash_attn(q, k, v), bwd_mode)
            finally:
                _setenv("FLASH_BWD", old)
        return fn, _bthd(B, T, H, Hkv, D, dtype)
    return make


def _setenv(name, value):
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


class _Restore(torch.autograd.Function):
    """Identity whose backward sets FLASH_BWD while the attention backward that follows runs."""

    @staticmethod
    def forward(ctx, o, mode):
        ctx.mode = mode
        return o.view_as(o)

    @staticmethod
    def backward(ctx, g):
        os.environ["FLASH_BWD"] = ctx.mode  # the flash backward runs right after this node
        return g, None


def _make_sdpa(backend_name):
    def make(B, T, H, Hkv, D, dtype):
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel
        backend = getattr(SDPBackend, backend_name)

        def fn(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                      enable_gqa=H != Hkv)
        return fn, _bhtd(B, T, H, Hkv, D, dtype)
    return make


def make_flex(B, T, H, Hkv, D, dtype):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, B=None, H=None, Q_LEN=T, KV_LEN=T,
                             device="cuda")
    compiled = torch.compile(flex_attention, dynamic=False)

    def fn(q, k, v):
        return compiled(q, k, v, block_mask=mask, enable_gqa=H != Hkv)
    return fn, _bhtd(B, T, H, Hkv, D, dtype)


def make_fla(B, T, H, Hkv, D, dtype):
    from fla.ops.attn import parallel_attn
    return (lambda q, k, v: parallel_attn(q, k, v)), _bthd(B, T, H, Hkv, D, dtype)


def make_linear(B, T, H, Hkv, D, dtype):
    from attn.linear import linear_attn
    return (lambda q, k, v: linear_attn(q, k, v)[0]), _bthd(B, T, H, H, D, dtype)


def make_lightning(B, T, H, Hkv, D, dtype):
    from attn.lightning import lightning_attn
    slopes = torch.tensor([2 ** (-8 * (i + 1) / H) for i in range(H)], device="cuda")
    return (lambda q, k, v: lightning_attn(q, k, v, slopes)[0]), _bthd(B, T, H, H, D, dtype)


def make_moba(B, T, H, Hkv, D, dtype):
    from attn.moba import moba_attn
    return (lambda q, k, v: moba_attn(q, k, v)), _bthd(B, T, H, Hkv, D, dtype)


def make_nsa(B, T, H, Hkv, D, dtype):
    from attn.nsa import nsa_attn
    q, k, v = _bthd(B, T, H, Hkv, D, dtype)
    tc = (T - 32) // 16 + 1
    k_cmp = torch.randn(B, tc, Hkv, D, device="cuda", dtype=dtype, requires_grad=True)
    v_cmp = torch.randn(B, tc, Hkv, D, device="cuda", dtype=dtype, requires_grad=True)
    gates = [torch.rand(B, T, H, device="cuda", dtype=dtype).clamp(0.01, 0.99).requires_grad_()
             for _ in range(3)]
    return nsa_attn, [q, k, v, k_cmp, v_cmp, *gates]


BACKENDS = {
    "flash": make_flash,
    "flash_triton": make_flash_setting(FWD_IMPL="triton", DKDV_IMPL="triton"),
    "flash_plain": make_flash_setting(FWD_IMPL="triton", FWD_AHEAD=False),
    "flash_dkdv_triton": make_flash_setting(DKDV_IMPL="triton"),
    "flash_split": make_flash_variant("split"),
    "flash_fused": make_flash_variant("fused"),
    "sdpa_flash": _make_sdpa("FLASH_ATTENTION"),
    "sdpa_cudnn": _make_sdpa("CUDNN_ATTENTION"),
    "flex": make_flex,
    "fla": make_fla,
    "linear": make_linear,
    "lightning": make_lightning,
    "moba": make_moba,
    "nsa": make_nsa,
}
SOFTMAX_EXACT = {"flash", "flash_triton", "flash_plain", "flash_dkdv_triton", "flash_split",
                 "flash_fused", "sdpa_flash", "sdpa_cudnn", "flex", "fla"}


# ----------------------------------------------------------------------------- measuring

def causal_flops(B, T, H, D, mode):
    f = 4.0 * B * H * T * T * D / 2
    return f * 3.5 if mode == "fwdbwd" else f


def bench_one(name, B, T, H, Hkv, D, dtype, modes, warmup, rep, ref_out):
    from triton.testing import do_bench
    torch.manual_seed(1234)  # every backend sees the same q, k, v (for the error column)
    fn, inputs = BACKENDS[name](B, T, H, Hkv, D, dtype)
    out = fn(*inputs)
    o = out.transpose(1, 2) if out.shape[1] == H and out.shape[2] == T and H != T else out
    rows, err = [], None
    if name in SOFTMAX_EXACT and ref_out is not None:
        err = ((o.float() - ref_out.float()).norm() / ref_out.float().norm()).item()
    do = torch.randn_like(out)
    grads = [t for t in inputs if t.requires_grad]
    for mode in modes:
        if mode == "fwd":
            with torch.no_grad():
                ms = do_bench(lambda: fn(*inputs), warmup=warmup, rep=rep, return_mode="median")
        else:
            def step():
                fn(*inputs).backward(do)
            ms = do_bench(step, warmup=warmup, rep=rep, grad_to_none=grads,
                          return_mode="median")
        fl = causal_flops(B, T, H, D, mode)
        rows.append(dict(backend=name, mode=mode, B=B, T=T, H=H, Hkv=Hkv, D=D,
                         dtype=str(dtype).replace("torch.", ""), ms=ms,
                         tflops=fl / ms / 1e9, tokens_per_s=B * T / ms * 1e3,
                         rel_err_vs_sdpa_flash=err))
    return rows, (o.detach() if name == "sdpa_flash" else None)


def _table(records, backends, seqlens, mode, cell):
    rows = []
    for b in backends:
        cells = []
        for t in seqlens:
            r = [x for x in records if x["backend"] == b and x["mode"] == mode and x["T"] == t]
            cells.append(cell(r[0]) if r else "-")
        rows.append((b, cells))
    return md_table(mode, [seq_label(t) for t in seqlens], rows)


def write_outputs(out_dir, records, meta, modes, quiet=False):
    """bench_attn.json (everything), bench_attn.md (TFLOP/s of the softmax backends, tokens/s of
    all), bench_attn.png (the same two views)."""
    seqlens = sorted({r["T"] for r in records})
    backends = list(dict.fromkeys(r["backend"] for r in records))
    soft = [b for b in backends if b in SOFTMAX_EXACT]
    lines = [f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, {meta['date']}; "
             f"B*T={meta['tokens']}, H={meta['H']}, Hkv={meta['Hkv']}, D={meta['D']}, "
             f"{meta['dtype']}, causal.", "",
             "Softmax attention, TFLOP/s (causal count 4*B*H*T^2*D/2, x3.5 for fwd+bwd) and "
             "median ms:", ""]
    for mode in modes:
        lines += _table(records, soft, seqlens, mode,
                        lambda r: f"{r['tflops']:.0f} ({r['ms']:.2f})")
    lines += ["All backends, million tokens/s:", ""]
    for mode in modes:
        lines += _table(records, backends, seqlens, mode,
                        lambda r: f"{r['tokens_per_s'] / 1e6:.2f}")
    lines += skipped_line(meta)
    write_report(out_dir, "bench_attn", dict(meta=meta, results=records),
                 "\n".join(lines) + "\n", quiet)
    try:
        plot(os.path.join(out_dir, "bench_attn.png"), records, meta, modes, soft, backends,
             seqlens)
    except Exception as e:  # plotting is optional
        print("plot skipped:", e)


def plot(path, records, meta, modes, soft, backends, seqlens):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [(m, soft, "tflops", "TFLOP/s (softmax backends)") for m in modes]
    panels += [(m, backends, "tokens_per_s", "tokens/s (all, log scale)") for m in modes]
    fig, axes = plt.subplots(2, len(modes), figsize=(6.5 * len(modes), 8), squeeze=False)
    for ax, (mode, names, key, label) in zip(axes.flat, panels):
        width = 0.8 / max(len(names), 1)
        for i, b in enumerate(names):
            ys = [next((x[key] for x in records if x["backend"] == b and x["mode"] == mode and
                        x["T"] == t), 0) for t in seqlens]
            ax.bar([j + i * width for j in range(len(seqlens))], ys, width, label=b)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(seqlens))])
        ax.set_xticklabels([f"{t // 1024}k" for t in seqlens])
        ax.set_title(f"{mode}: {label}", fontsize=10)
        ax.set_xlabel("T (B*T fixed)")
        if key == "tokens_per_s":
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.suptitle(f"{meta['device']}, {meta['dtype']}, H={meta['H']}, D={meta['D']}, causal, "
                 f"B*T={meta['tokens']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backends", default="flash,sdpa_flash,sdpa_cudnn,fla,flex,linear,"
                                          "lightning,moba,nsa")
    ap.add_argument("--seqlens", default="4096,16384,65536")
    ap.add_argument("--tokens", type=int, default=32768, help="B*T")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=None)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--modes", default="fwd,fwdbwd")
    ap.add_argument("--warmup", type=int, default=50, help="ms")
    ap.add_argument("--rep", type=int, default=300, help="ms")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--replot", metavar="JSON", help="rewrite bench_attn.md / .png of --out from a "
                    "bench_attn.json (no GPU needed)")
    a = ap.parse_args(argv)
    if a.replot:
        d = json.load(open(a.replot))
        write_outputs(a.out, d["results"], d["meta"], a.modes.split(","))
        return
    require_cuda("bench_attn.py")
    H, D, dtype = a.heads, a.head_dim, DTYPES[a.dtype]
    Hkv = a.kv_heads or H
    modes = a.modes.split(",")
    meta = run_meta(tokens=a.tokens, H=H, Hkv=Hkv, D=D, dtype=a.dtype)
    records = []
    env_bwd = os.environ.get("FLASH_BWD")
    for T in [int(t) for t in a.seqlens.split(",")]:
        B = max(a.tokens // T, 1)
        ref_out = None
        names = a.backends.split(",")
        if "sdpa_flash" in names:  # first: its output is the others' sanity reference
            names = ["sdpa_flash"] + [n for n in names if n != "sdpa_flash"]
        for name in names:
            t0 = time.time()
            got = run_guarded(meta["skipped"], name, f"T={T}", lambda: bench_one(
                name, B, T, H, Hkv, D, dtype, modes, a.warmup, a.rep, ref_out))
            _setenv("FLASH_BWD", env_bwd)  # the variants set it while they run
            if got is None:
                continue
            rows, o = got
            ref_out = o if o is not None else ref_out
            records += rows
            for r in rows:
                print(f"{name:11s} T={T:6d} B={B:2d} {r['mode']:6s} {r['ms']:8.3f} ms "
                      f"{r['tflops']:6.1f} TFLOP/s  err={r['rel_err_vs_sdpa_flash']}"
                      f"  ({time.time() - t0:.0f}s)", flush=True)
        write_outputs(a.out, records, meta, modes, quiet=True)  # partial results survive
    meta["flash_tuned"] = flash_tuned_configs()
    write_outputs(a.out, records, meta, modes)


def flash_tuned_configs() -> dict:
    """The autotuner's pick per kernel and key of our flash (empty with autotuning off)."""
    try:
        from attn.flash import bwd, fwd
        kernels = {"fwd": fwd._fwd_tuned, "dkdv": bwd._dkdv_tuned, "dq": bwd._dq_tuned,
                   "fused": bwd._fused_tuned}
        return {name: {str(k): str(c) for k, c in getattr(t, "cache", {}).items()}
                for name, t in kernels.items()}
    except Exception as e:  # informational only
        return {"error": repr(e)}


if __name__ == "__main__":
    main()
