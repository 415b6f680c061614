#!/usr/bin/env python
"""`attn=sdpa` with packed documents: FlexAttention path vs the old per-document loop vs ours.

    python3 scripts/bench/bench_sdpa_docs.py [--seqlens 8192,32768] [--docs-per-8k 30]
        [--kv-heads 16] [--methods ...] [--autotune] [--out DIR]

One packed row of T tokens (B = 1) cut into documents of random length (about T / 8192 ·
--docs-per-8k of them), H = 16, D = 64, bf16 (the 350m model's attention). Methods:
  per_doc     one causal SDPA call per document (attn=sdpa before: host sync + Python loop)
  flex        sdpa_attn(cu_seqlens=...) in eager mode: compiled FlexAttention, block mask cached
              (what layers 2..24 of a forward pay)
  flex_build  the same with the mask built (and cu_seqlens validated) every call (layer 1)
  flex_graph  sdpa_attn inside torch.compile(fullgraph=True): mask build + FlexAttention in the
              graph (trainer.compile=true)
  flex_tuned  FlexAttention compiled with mode="max-autotune-no-cudagraphs" (only with
              --autotune: minutes of autotuning per shape)
  flash       our Triton kernel, attn.flash.flash_attn(cu_seqlens=...)
  causal      one causal SDPA call over the whole row, ignoring documents (more work: a yardstick,
              not the same computation)
  mask_build  build_block_mask alone (forward column only)
Times are medians of triton.testing.do_bench (fwd, and fwd+bwd with a fixed dO). TFLOP/s count
the document-causal work, Σ_docs 2·H·D·L² for the forward (x3.5 for fwd+bwd), for every method.
`err` is the forward's max relative difference to per_doc; `extra GiB` the peak allocation above
the inputs while fwd+bwd is timed (do_bench's 0.25 GiB L2-flush buffer included for every method);
`first call s` the first fwd+bwd, compilation included. Prints a Markdown table; with --out also
writes bench_sdpa_docs.json and .md there.
"""
from __future__ import annotations

import argparse
import json
import time
import traceback

import torch

from harness import md_table, require_cuda, run_meta, write_report

METHODS = ["per_doc", "flex", "flex_build", "flex_graph", "flex_tuned", "flash", "causal",
           "mask_build"]


def make_docs(T: int, n_docs: int, gen: torch.Generator) -> torch.Tensor:
    """cu_seqlens of n_docs documents (lengths ~ exponential, none empty) over T tokens."""
    w = torch.empty(n_docs).exponential_(generator=gen) + 0.05
    cuts = (w.cumsum(0) / w.sum() * T).round().long()
    cu = torch.cat([torch.tensor([0]), cuts]).unique()
    cu[-1] = T
    return cu.int().cuda()


def make_fn(name, cu, scale):
    """fn(q, k, v) -> o [1, T, H, D] for method `name`."""
    from attn.sdpa import sdpa_attn, sdpa_per_document
    import attn.sdpa.flex as flexmod
    if name == "per_doc":
        return lambda q, k, v: sdpa_per_document(q, k, v, scale, cu)
    if name == "flex":
        return lambda q, k, v: sdpa_attn(q, k, v, scale=scale, cu_seqlens=cu)
    if name == "flex_build":
        def fn(q, k, v):
            flexmod._CACHE.clear()
            return sdpa_attn(q, k, v, scale=scale, cu_seqlens=cu)
        return fn
    if name == "flex_graph":
        graph = torch.compile(lambda q, k, v, cu: sdpa_attn(q, k, v, scale=scale, cu_seqlens=cu),
                              fullgraph=True)
        return lambda q, k, v: graph(q, k, v, cu)
    if name == "flex_tuned":
        from torch.nn.attention.flex_attention import flex_attention
        tuned = torch.compile(flex_attention, dynamic=False, mode="max-autotune-no-cudagraphs")

        def fn(q, k, v):
            bm = flexmod.block_mask_for(q.shape[1], k.shape[1], 0, cu, None, q.device, 1)
            o = tuned(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=bm,
                      scale=scale, enable_gqa=q.shape[2] != k.shape[2])
            return o.transpose(1, 2)
        return fn
    if name == "flash":
        from attn.flash import flash_attn
        return lambda q, k, v: flash_attn(q, k, v, scale=scale, cu_seqlens=cu)
    if name == "causal":
        return lambda q, k, v: sdpa_attn(q, k, v, scale=scale)
    raise ValueError(f"--methods: unknown method {name!r} (choose from {', '.join(METHODS)})")


def bench_one(name, T, cu, q, k, v, do, scale, ref_o, flops_fwd):
    from triton.testing import do_bench
    row = dict(T=T, docs=cu.numel() - 1, method=name)
    if name == "mask_build":
        from attn.sdpa.flex import build_block_mask
        row["fwd_ms"] = do_bench(lambda: build_block_mask(T, T, 0, cu, None, q.device),
                                 return_mode="median")
        return row
    fn = make_fn(name, cu, scale)
    t0 = time.perf_counter()
    o = fn(q, k, v)
    o.backward(do)
    torch.cuda.synchronize()
    row["first_call_s"] = time.perf_counter() - t0          # compilation, autotuning
    if ref_o is not None:
        row["err"] = ((o.float() - ref_o.float()).abs().max() / ref_o.float().abs().max()).item()

    def step():
        fn(q, k, v).backward(do)
    # forward timed with autograd on: no_grad would recompile the compiled methods (grad mode
    # is part of their guards) and cost device minutes for the same kernels
    row["fwd_ms"] = do_bench(lambda: fn(q, k, v), return_mode="median")
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    row["fwd_bwd_ms"] = do_bench(step, grad_to_none=[q, k, v], return_mode="median")
    row["peak_extra_gib"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
    row["tflops_fwd_bwd"] = 3.5 * flops_fwd / row["fwd_bwd_ms"] / 1e9
    return row


def markdown(rows):
    base = {r["T"]: r.get("fwd_bwd_ms") for r in rows if r["method"] == "per_doc"}
    columns = ["docs", "method", "fwd ms", "fwd+bwd ms", "TFLOP/s (fwd+bwd)", "vs per_doc",
               "extra GiB", "err", "first call s"]
    table = []
    for r in rows:
        if "error" in r:
            table.append((r["T"], [str(r["docs"]), r["method"], f"failed: {r['error']}"]
                          + [""] * (len(columns) - 3)))
            continue
        fb = r.get("fwd_bwd_ms")
        speed = f"{base[r['T']] / fb:.2f}x" if fb and base.get(r["T"]) else ""

        def cell(key, fmt, r=r):
            return format(r[key], fmt) if key in r else ""
        table.append((r["T"], [str(r["docs"]), r["method"], cell("fwd_ms", ".3f"),
                               cell("fwd_bwd_ms", ".3f"), cell("tflops_fwd_bwd", ".1f"), speed,
                               cell("peak_extra_gib", ".2f"), cell("err", ".1e"),
                               cell("first_call_s", ".1f")]))
    return "\n".join(md_table("T", columns, table)).rstrip()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seqlens", default="8192,32768")
    ap.add_argument("--docs-per-8k", type=float, default=30.0,
                    help="documents per 8192 tokens (the count scales with T)")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--methods", default=",".join(m for m in METHODS if m != "flex_tuned"))
    ap.add_argument("--autotune", action="store_true", help="add flex_tuned")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    require_cuda("bench_sdpa_docs.py")
    methods = [m for m in args.methods.split(",") if m]
    if args.autotune and "flex_tuned" not in methods:
        methods.append("flex_tuned")
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"--methods: unknown method {m!r} (choose from {', '.join(METHODS)})")
    H, Hkv, D = args.heads, args.kv_heads, args.head_dim
    scale = D ** -0.5
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    for T in (int(t) for t in args.seqlens.split(",")):
        cu = make_docs(T, max(1, round(args.docs_per_8k * T / 8192)), gen)
        lens = (cu[1:] - cu[:-1]).double()
        flops_fwd = float(2 * H * D * (lens ** 2).sum())
        q = torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(1, T, Hkv, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(1, T, Hkv, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        do = torch.randn_like(q)
        with torch.no_grad():
            from attn.sdpa import sdpa_per_document
            ref_o = sdpa_per_document(q, k, v, scale, cu)
        for name in methods:
            try:
                row = bench_one(name, T, cu, q, k, v, do, scale,
                                None if name in ("causal", "per_doc") else ref_o, flops_fwd)
            except Exception as err:  # keep the other methods' numbers; say why this one failed
                traceback.print_exc()
                row = dict(T=T, docs=cu.numel() - 1, method=name,
                           error=f"{type(err).__name__}: {str(err).splitlines()[0][:120]}")
            rows.append(row)
            print(json.dumps(row), flush=True)
    meta = run_meta(H=H, Hkv=Hkv, D=D, dtype="bf16")
    head = (f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, H={H}, "
            f"Hkv={Hkv}, D={D}, bf16, {meta['date']}")
    md = f"{head}\n\n{markdown(rows)}\n"
    print(f"\n{md}")
    if args.out:
        write_report(args.out, "bench_sdpa_docs", dict(meta=meta, results=rows), md)


if __name__ == "__main__":
    main()
