#!/usr/bin/env python
"""Benchmark of the linear-attention families against flash-linear-attention (fla), one table.

    python3 scripts/bench/bench_linear.py --out OUT [--seqlens 2048,...,65536] [--tokens 32768]
        [--backends lightning,fla_gla,fla_lightning,linear,fla_linear] [--modes fwd,fwdbwd]

Backends: `lightning` / `linear` are our public ops (attn.lightning.lightning_attn,
attn.linear.linear_attn); `lightning@512` runs ours with another segment length (kernels.SEG_LEN,
default 1024); `fla_gla` is fla's chunk_simple_gla with g_gamma = -slopes, our lightning's decay
exp(-slopes[h]) per step: the like-for-like peer, whose error column checks the semantics;
`fla_lightning` / `fla_linear` are fla's chunk_lightning_attn / chunk_linear_attn(normalize=
False), when `fla` imports (skipped with a note otherwise). fla's chunk_lightning_attn decays by
-(8/H)(1 - l/L)·h (linear in the head index h, none at h = 0), not by ALiBi slopes, so its output
differs from ours by design (error ~1): a speed peer only.
Shapes: H = 16, D = 128, bf16, [B, T, H, D]; B = max(tokens // T, 1), so 32k tokens per batch up
to T = 32k and B = 1 (T tokens) beyond: the issue's 4k/16k (32k tokens) and 64k (64k tokens).
Times: median ms of triton.testing.do_bench (forward under no_grad; forward+backward with a fixed
upstream gradient), ns per token = ms / (B*T), per-token flatness = max/min over T; next to them
the kernels' own GPU time per call (torch.profiler), which the host cannot inflate. Our lightning
uses the ALiBi slopes of layer 0 of 24 (depth factor 1 + 1e-5), the same for fla_gla.
Writes bench_linear.json and bench_linear.md into --out.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import os
import time

import torch

from harness import md_table, require_cuda, run_guarded, run_meta, seq_label, skipped_line, \
    write_report

# the issue's fla 0.6 chunk_lightning_attn numbers on the reference H100 (ms), for the goal column
ISSUE_FLA = {("fwd", 4096): 0.71, ("fwd", 16384): 0.67, ("fwd", 65536): 1.75,
             ("fwdbwd", 4096): 2.63, ("fwdbwd", 16384): 2.96, ("fwdbwd", 65536): 7.16}
GOAL = 0.8          # ours <= 0.8 x fla
FLAT = 1.10         # per-token time flat within 10 % from 2k to 64k
LAYER, N_LAYERS = 0, 24  # the layer whose ALiBi slopes our lightning and fla_gla use
# (ours, like-for-like fla peer): the speed ratio and the error column
PEERS = (("lightning", "fla_gla"), ("linear", "fla_linear"))
DEVICE = "cuda"     # --device cpu: a smoke run of the script's logic (TRITON_INTERPRET=1)


def _call_kwargs(fn, **kw):
    params = inspect.signature(fn).parameters
    return {k: v for k, v in kw.items() if k in params}


def make(name, B, T, H, D, dtype):
    """(fn(q, k, v) -> o, slopes or None)."""
    if name in ("lightning", "linear"):
        from attn.lightning import alibi_slopes, lightning_attn
        from attn.linear import linear_attn
        if name == "linear":
            return (lambda q, k, v: linear_attn(q, k, v)[0]), None
        depth = 1 - LAYER / (N_LAYERS - 1) + 1e-5
        slopes = torch.tensor([s * depth for s in alibi_slopes(H)], device=DEVICE)
        return (lambda q, k, v: lightning_attn(q, k, v, slopes)[0]), slopes
    if name == "fla_gla":
        from attn.lightning import alibi_slopes
        from fla.ops.simple_gla import chunk_simple_gla as f
        depth = 1 - LAYER / (N_LAYERS - 1) + 1e-5
        # log decay per step and head: ours multiplies the state by exp(-slopes[h]) per token
        g_gamma = -torch.tensor([s * depth for s in alibi_slopes(H)], device=DEVICE)
        kw = _call_kwargs(f, scale=D ** -0.5, head_first=False)
        return (lambda q, k, v: f(q, k, v, g_gamma=g_gamma, **kw)[0]), -g_gamma
    if name == "fla_lightning":
        from fla.ops.lightning_attn import chunk_lightning_attn as f
        kw = _call_kwargs(f, layer_idx=LAYER, num_layers=N_LAYERS, head_first=False)
        return (lambda q, k, v: f(q, k, v, **kw)[0]), None
    if name == "fla_linear":
        from fla.ops.linear_attn import chunk_linear_attn as f
        kw = _call_kwargs(f, normalize=False, head_first=False)
        return (lambda q, k, v: f(q, k, v, **kw)[0]), None
    raise KeyError(name)


def bench_one(name, B, T, H, D, dtype, modes, warmup, rep):
    """A backend name may carry a segment length, e.g. lightning@512 (SEG_LEN = 512 tokens)."""
    from attn.linear import kernels
    base, _, seg = name.partition("@")
    saved = kernels.SEG_LEN
    try:
        if seg:
            kernels.SEG_LEN = int(seg)
        rows, out = _bench_one(base, B, T, H, D, dtype, modes, warmup, rep)
    finally:
        kernels.SEG_LEN = saved
    for r in rows:
        r["backend"] = name
    return rows, out


def _cpu_bench(fn, warmup, rep, grad_to_none=None, return_mode="median"):
    """Stand-in for do_bench in --device cpu smoke runs (script logic only, not timings)."""
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[1]


def _bench_one(name, B, T, H, D, dtype, modes, warmup, rep):
    if DEVICE == "cuda":
        from triton.testing import do_bench
    else:
        do_bench = _cpu_bench
    torch.manual_seed(1234)  # the same q, k, v for every backend (error column)
    q, k, v = (torch.randn(B, T, H, D, device=DEVICE, dtype=dtype).requires_grad_()
               for _ in range(3))
    fn, _ = make(name, B, T, H, D, dtype)
    out = fn(q, k, v)
    do = torch.randn_like(out)
    if "fwdbwd" in modes:  # autotune / compile the backward before timing (do_bench sizes its
        fn(q, k, v).backward(do)  # repeat count from the first calls)
        q.grad = k.grad = v.grad = None
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    rows = []
    cuda = DEVICE == "cuda"
    for mode in modes:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            before = device_allocs()
        if mode == "fwd":
            with torch.no_grad():
                ms = do_bench(lambda: fn(q, k, v), warmup=warmup, rep=rep, return_mode="median")
        else:
            ms = do_bench(lambda: fn(q, k, v).backward(do), warmup=warmup, rep=rep,
                          grad_to_none=[q, k, v], return_mode="median")
        kernel_ms = host = allocs = None
        if cuda:
            # cudaMalloc / cudaFree calls while timing: each free synchronizes the device, so
            # an allocator that frees and refills every repeat makes the wall time kernel + host
            allocs = [a - b for a, b in zip(device_allocs(), before)]
            call = (lambda: fn(q, k, v)) if mode == "fwd" else (lambda: fn(q, k, v).backward(do))
            with torch.no_grad() if mode == "fwd" else contextlib.nullcontext():
                kernel_ms = device_ms(call, [q, k, v])
                host = host_ms(call, [q, k, v])
        rows.append(dict(backend=name, mode=mode, B=B, T=T, H=H, D=D,
                         dtype=str(dtype).replace("torch.", ""), ms=ms, kernel_ms=kernel_ms, host_ms=host,
                         device_mallocs_frees=allocs,
                         ns_per_token=ms * 1e6 / (B * T),
                         peak_mem_gb=torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else 0))
    return rows, out.detach()


def kernel_times(call, inputs, n: int) -> dict:
    """{kernel name: (calls, GPU us)} over n calls (torch.profiler, kernels only). Each call
    starts with fresh gradients, as in the timing: else autograd's accumulation (one add kernel
    per input) shows up as if it were the op's."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            for t in inputs:
                t.grad = None
            call()
        torch.cuda.synchronize()
    return {e.key: (e.count, getattr(e, "device_time_total", None)
                    or getattr(e, "cuda_time_total", 0))
            for e in prof.key_averages() if e.device_type == DeviceType.CUDA}


def device_ms(call, inputs, n: int = 5) -> float:
    """GPU time of one call, summed over its kernels: the time the kernels take whatever the
    host does between them. Where the wall time (do_bench) is well above it, the call waited on
    the host (launches, allocations), not on its kernels."""
    return sum(us for _, us in kernel_times(call, inputs, n).values()) / n / 1e3


def device_allocs() -> list:
    """[cudaMalloc calls, cudaFree calls] of the caching allocator so far."""
    st = torch.cuda.memory_stats()
    return [st.get("num_device_alloc", 0), st.get("num_device_free", 0)]


def host_ms(call, inputs, n: int = 20) -> float:
    """Median host time to issue one call (from a synchronized start, without waiting for the
    GPU): if it approaches the kernel time, the GPU waits on the host between launches."""
    times = []
    for _ in range(n):
        for t in inputs:
            t.grad = None
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return sorted(times)[n // 2]


def kernel_breakdown(T, H, D, dtype, tokens):
    """GPU time per kernel of one forward+backward of our lightning op (torch.profiler)."""
    B = max(tokens // T, 1)
    fn, _ = make("lightning", B, T, H, D, dtype)
    q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=dtype).requires_grad_()
               for _ in range(3))
    do = torch.randn_like(q)
    fn(q, k, v).backward(do)  # compiled and tuned already by the timing runs
    times = kernel_times(lambda: fn(q, k, v).backward(do), [q, k, v], 3)
    rows = {key: dict(calls=calls // 3, us_per_step=us / 3)
            for key, (calls, us) in times.items() if us > 0}
    return dict(T=T, B=B, kernels=dict(sorted(rows.items(), key=lambda kv: -kv[1]["us_per_step"])))


def tuned_configs():
    """The autotuner's picks (key -> config) of our pass-1 and pass-3 kernels."""
    try:
        from attn.linear import launch as op
        return {kern: {str(k): str(c) for k, c in getattr(t, "cache", {}).items()}
                for kern, t in (("chunk_out", op._out_tuned), ("seg_state", op._state_tuned))}
    except Exception as e:  # informational only
        return {"error": repr(e)}


def write(out_dir, records, meta, modes, errors):
    meta = dict(meta, tuned=tuned_configs(), errors_vs_fla=errors)
    seqlens = sorted({r["T"] for r in records})
    backends = list(dict.fromkeys(r["backend"] for r in records))

    def get(b, mode, t):
        r = [x for x in records if x["backend"] == b and x["mode"] == mode and x["T"] == t]
        return r[0] if r else None

    lines = [f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, {meta['date']}; "
             f"H={meta['H']}, D={meta['D']}, {meta['dtype']}, B = max({meta['tokens']} // T, 1). "
             "Median ms (ns per token).", ""]
    for mode in modes:
        rows = []
        for b in backends:
            cells, per_tok = [], []
            for t in seqlens:
                r = get(b, mode, t)
                cells.append(f"{r['ms']:.3f} ({r['ns_per_token']:.2f})" if r else "-")
                if r:
                    per_tok.append(r["ns_per_token"])
            flat = max(per_tok) / min(per_tok) if per_tok else float("nan")
            rows.append((b, cells + [f"{flat:.3f} {'ok' if flat <= FLAT else 'NOT flat'}"]))
        for ours, theirs in PEERS:
            if ours not in backends:
                continue
            cells = []
            for t in seqlens:
                r, f = get(ours, mode, t), get(theirs, mode, t)
                issue = ISSUE_FLA.get((mode, t)) if ours == "lightning" else None
                parts = []
                if r and f:
                    ratio = r["ms"] / f["ms"]
                    parts.append(f"{ratio:.2f}x fla {'ok' if ratio <= GOAL else 'MISS'}")
                if r and issue:
                    ratio = r["ms"] / issue
                    parts.append(f"{ratio:.2f}x issue {'ok' if ratio <= GOAL else 'MISS'}")
                cells.append(", ".join(parts) or "-")
            rows.append((f"{ours} / {theirs} (goal <= {GOAL})", cells + [""]))
        lines += md_table(mode, [seq_label(t) for t in seqlens] + ["flat (max/min ns/token)"],
                          rows)
    for mode in modes:  # GPU time of the kernels alone: where wall >> kernels, the host limits
        rows = []
        for b in backends:
            cells = []
            for t in seqlens:
                r = get(b, mode, t)
                k = r.get("kernel_ms") if r else None
                h = r.get("host_ms") if r else None
                m = (r or {}).get("device_mallocs_frees")
                extra = (f", host {h:.3f}" if h else "") + (f", cudaMalloc/Free {m[0]}/{m[1]}"
                                                             if m and any(m) else "")
                cells.append(f"{k:.3f} (wall {r['ms'] / k:.2f}x{extra})" if k else "-")
            rows.append((b, cells))
        for ours, theirs in PEERS:
            if ours in backends and theirs in backends:
                cells = []
                for t in seqlens:
                    r, f = get(ours, mode, t), get(theirs, mode, t)
                    ok = r and f and r.get("kernel_ms") and f.get("kernel_ms")
                    cells.append(f"{r['kernel_ms'] / f['kernel_ms']:.2f}x" if ok else "-")
                rows.append((f"{ours} / {theirs}", cells))
        lines += [f"Kernel time of one call, {mode} (ms, torch.profiler; wall = the median above; "
                  "host = the median time to issue the call):",
                  ""]
        lines += md_table(mode, [seq_label(t) for t in seqlens], rows)
    lines.append("Issue's fla 0.6 chunk_lightning_attn (ms): "
                 + ", ".join(f"{m} T={t // 1024}k {v}" for (m, t), v in ISSUE_FLA.items()))
    if errors:
        lines.append("Relative error of our output vs fla's (same inputs; lightning vs fla_gla: "
                     "the same decay; vs fla_lightning: fla's own decay, ~1 by design): "
                     + ", ".join(f"{k}: {v:.2e}" for k, v in errors.items()))
    lines += skipped_line(meta)
    bd = meta.get("breakdown") or {}
    if "kernels" in bd:
        lines += ["", f"Per-kernel GPU time of one lightning forward+backward at T={bd['T']}, "
                  f"B={bd['B']} (us):", ""]
        lines += md_table("kernel", ["calls", "us"], [
            (k[:60], [str(v["calls"]), f"{v['us_per_step']:.0f}"])
            for k, v in list(bd["kernels"].items())[:15]])
    md = "\n".join(lines) + "\n"
    return write_report(out_dir, "bench_linear", dict(meta=meta, results=records), md)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backends", default="lightning,fla_gla,fla_lightning,linear,fla_linear")
    ap.add_argument("--seqlens", default="2048,4096,8192,16384,32768,65536")
    ap.add_argument("--tokens", type=int, default=32768, help="B*T below T = tokens")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--modes", default="fwd,fwdbwd")
    ap.add_argument("--warmup", type=int, default=250,
                    help="ms (long: after a compile pause the GPU first has to clock up again)")
    ap.add_argument("--rep", type=int, default=100, help="ms")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--profile-T", type=int, default=16384,
                    help="T of the per-kernel breakdown of our lightning (0: none)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: smoke run of the script (interpreter, tiny shapes), no timings")
    a = ap.parse_args(argv)
    global DEVICE
    DEVICE = a.device
    if DEVICE == "cuda":
        require_cuda("bench_linear.py")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    H, D, modes = a.heads, a.head_dim, a.modes.split(",")
    meta = run_meta(device=None if DEVICE == "cuda" else "cpu", tokens=a.tokens, H=H, D=D,
                    dtype=a.dtype)
    try:
        import fla
        meta["fla"] = getattr(fla, "__version__", "?")
    except Exception as e:
        meta["fla"] = f"not importable: {e!r}"
    records, errors = [], {}
    for T in [int(t) for t in a.seqlens.split(",")]:
        B = max(a.tokens // T, 1)
        outs = {}
        for name in a.backends.split(","):
            t0 = time.time()
            got = run_guarded(meta["skipped"], name, f"T={T}", lambda: bench_one(
                name, B, T, H, D, dtype, modes, a.warmup, a.rep))
            if got is None:
                continue
            rows, outs[name] = got
            records += rows
            for r in rows:
                print(f"{name:14s} T={T:6d} B={B:2d} {r['mode']:6s} {r['ms']:8.3f} ms "
                      f"{r['ns_per_token']:7.3f} ns/token ({time.time() - t0:.0f}s)", flush=True)
        for ours, theirs in (*PEERS, ("lightning", "fla_lightning")):
            if ours in outs and theirs in outs:
                x, y = outs[ours].float(), outs[theirs].float()
                errors[f"{ours} vs {theirs}@T={T}"] = ((x - y).norm() / y.norm()).item()
        outs.clear()
        write(a.out, records, meta, modes, errors)  # partial results survive a later failure
    if DEVICE == "cuda" and a.profile_T and any(r["backend"] == "lightning" for r in records):
        try:
            meta["breakdown"] = kernel_breakdown(a.profile_T, H, D, dtype, a.tokens)
        except Exception as e:  # informational only
            meta["breakdown"] = {"error": repr(e)}
    print(write(a.out, records, meta, modes, errors))


if __name__ == "__main__":
    main()
