#!/usr/bin/env python
"""MoBA benchmark: our Triton MoBA (gating and top-k included) against full causal attention
and FlexAttention at MoBA's density.

    python3 scripts/bench/bench_moba.py --out OUT [--seqlens 8192,...,131072] [--block 512 --topk 3]

Shapes: B = 1, H = 16 (Hkv = --kv-heads, default 16), D = 128, bf16, T in {8k, 16k, 32k, 64k,
128k}. Backends:
  moba        attn.moba.moba_attn (ATTN_IMPL unset: Triton on CUDA), per-token routing per head,
              gate (mean pooling + top-(k−1)) inside the timed region
  flash       attn.flash.flash_attn, full causal attention (our kernel)
  sdpa_cudnn  torch SDPA with the cuDNN backend, full causal attention
  flex        torch FlexAttention (compiled) with a block mask at MoBA's density: block
              `--block`, top-k including the own block, routed per 128-query tile (random
              earlier blocks per (head, tile)), mask built once outside the timed region
Times: medians of triton.testing.do_bench in ms, fwd and fwd+bwd; peak memory: the
torch.cuda.max_memory_allocated increase over the inputs during one fwd+bwd. --rounds N times
every backend N times per T, the backends taking turns within each round (all built once per
T), and reports the medians over the rounds (every round's times in the JSON): single runs
differ by ~1.5 % (docs/moba_notes.md), so a ratio near 1 needs rounds. Writes bench_moba.json
and bench_moba.md into --out.
"""
from __future__ import annotations

import argparse
import os
import statistics

import torch

from harness import md_table, require_cuda, run_guarded, run_meta, seq_label, skipped_line, \
    time_fwd_bwd, write_report


def _inputs(T, H, Hkv, D, dtype, layout):
    torch.manual_seed(1234)
    q = torch.randn(1, T, H, D, device="cuda", dtype=dtype)
    k = torch.randn(1, T, Hkv, D, device="cuda", dtype=dtype)
    v = torch.randn(1, T, Hkv, D, device="cuda", dtype=dtype)
    if layout == "bhtd":
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    return [t.requires_grad_() for t in (q, k, v)]


def make_moba(T, H, Hkv, D, dtype, block, topk):
    from attn.moba import moba_attn
    return (lambda q, k, v: moba_attn(q, k, v, block_size=block, topk=topk)), \
        _inputs(T, H, Hkv, D, dtype, "bthd")


def make_flash(T, H, Hkv, D, dtype, block, topk):
    from attn.flash import flash_attn
    return flash_attn, _inputs(T, H, Hkv, D, dtype, "bthd")


def make_sdpa_cudnn(T, H, Hkv, D, dtype, block, topk):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def fn(q, k, v):
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=H != Hkv)
    return fn, _inputs(T, H, Hkv, D, dtype, "bhtd")


def flex_block_mask(T, H, block, topk, tile=128, device="cuda"):
    """FlexAttention BlockMask at MoBA's density, built from tile indices (no [H, T, T] mask is
    ever formed, so it scales to 128k+): per (head, 128-query tile) the tiles of its own MoBA
    block up to the diagonal (earlier ones full, the diagonal one causal) and every tile of
    topk−1 random earlier blocks (full)."""
    from torch.nn.attention.flex_attention import BlockMask
    assert block % tile == 0, "flex baseline: block must be a multiple of the 128-token tile"
    per = block // tile                                   # tiles per MoBA block
    nblk, ntile = -(-T // block), -(-T // tile)
    g = torch.Generator(device=device).manual_seed(0)
    score = torch.rand(H, ntile, nblk, device=device, generator=g)
    tiles = torch.arange(ntile, device=device)
    own = tiles // per                                    # each query tile's own MoBA block
    earlier = torch.arange(nblk, device=device)[None, :] < own[:, None]
    score = score.masked_fill(~earlier[None], -1.0)
    n = max(min(topk - 1, nblk), 0)
    chosen = torch.zeros(H, ntile, nblk, dtype=torch.bool, device=device)
    if n:
        top = score.topk(n, -1)
        chosen.scatter_(-1, top.indices, top.values >= 0)
    kv_tile = tiles[None, :]                              # [1, ntile] kv tile ids
    full = chosen.repeat_interleave(per, -1)[..., :ntile]  # [H, q tile, kv tile]
    full |= ((kv_tile < tiles[:, None]) & (kv_tile >= own[:, None] * per))[None]
    full_num = full.sum(-1, dtype=torch.int32)
    full_idx = torch.argsort((~full).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    diag_num = torch.ones(H, ntile, dtype=torch.int32, device=device)
    diag_idx = torch.zeros(H, ntile, ntile, dtype=torch.int32, device=device)
    diag_idx[..., 0] = tiles.to(torch.int32)

    def moba_mask(b, h, qi, ki):  # exact everywhere; the fused kernel evaluates it on the diagonal
        return ((qi // block == ki // block) & (qi >= ki)) | chosen[h, qi // tile, ki // block]
    return BlockMask.from_kv_blocks(diag_num[None], diag_idx[None], full_num[None], full_idx[None],
                                    BLOCK_SIZE=tile, mask_mod=moba_mask, seq_lengths=(T, T))


def make_flex(T, H, Hkv, D, dtype, block, topk, tile=128):
    from torch.nn.attention.flex_attention import flex_attention
    mask = flex_block_mask(T, H, block, topk, tile)
    compiled = torch.compile(flex_attention, dynamic=False)
    return (lambda q, k, v: compiled(q, k, v, block_mask=mask, enable_gqa=H != Hkv)), \
        _inputs(T, H, Hkv, D, dtype, "bhtd")


BACKENDS = {"moba": make_moba, "flash": make_flash, "sdpa_cudnn": make_sdpa_cudnn,
            "flex": make_flex}


def bench_rounds(names, T, shape, rounds, warmup, rep, skipped):
    """Records of the backends that ran at sequence length T: medians over `rounds` rounds, in
    each of which every backend is timed once, in turn (rounds: every round's result)."""
    H, Hkv, D, block, topk = shape
    made = {}
    for name in names:
        m = run_guarded(skipped, name, f"T={T}", lambda: BACKENDS[name](
            T, H, Hkv, D, torch.bfloat16, block, topk))
        if m is not None:
            made[name] = m
    runs = {name: [] for name in made}
    for _ in range(rounds):
        for name, (fn, inputs) in made.items():
            r = run_guarded(skipped, name, f"T={T}", lambda: time_fwd_bwd(fn, inputs, warmup,
                                                                           rep))
            if r is not None:
                runs[name].append(r)
    return [dict(backend=name, T=T, H=H, Hkv=Hkv, D=D, block=block, topk=topk,
                 **{k: statistics.median(r[k] for r in rs) for k in rs[0]}, rounds=rs)
            for name, rs in runs.items() if rs]


def write_outputs(out, records, meta, quiet=False):
    seqlens = sorted({r["T"] for r in records})
    names = list(dict.fromkeys(r["backend"] for r in records))
    lines = [f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, {meta['date']}; "
             f"B=1, H={meta['H']}, Hkv={meta['Hkv']}, D={meta['D']}, bf16; MoBA block "
             f"{meta['block']}, top-{meta['topk']} (own block included), gating included; "
             "flex: same density routed per 128-query tile, mask precomputed; medians of "
             f"{meta.get('rounds', 1)} round(s), the backends taking turns.", ""]
    for key, title in (("fwd_ms", "forward, ms"), ("fwdbwd_ms", "forward+backward, ms"),
                       ("peak_mib", "peak memory of one fwd+bwd over the inputs, MiB")):
        rows = []
        for n in names:
            cells = []
            for t in seqlens:
                r = [x for x in records if x["backend"] == n and x["T"] == t]
                cells.append(f"{r[0][key]:.2f}" if r else "-")
            rows.append((n, cells))
        lines += md_table(title, [seq_label(t) for t in seqlens], rows)
    lines += skipped_line(meta)
    write_report(out, "bench_moba", dict(meta=meta, results=records), "\n".join(lines) + "\n",
                 quiet)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backends", default="moba,flash,sdpa_cudnn,flex")
    ap.add_argument("--seqlens", default="8192,16384,32768,65536,131072")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=None)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block", type=int, default=512)
    ap.add_argument("--topk", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=25, help="ms")
    ap.add_argument("--rep", type=int, default=100, help="ms")
    ap.add_argument("--rounds", type=int, default=1, help="timing rounds per T (module doc)")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    a = ap.parse_args(argv)
    require_cuda("bench_moba.py")
    H, D, Hkv = a.heads, a.head_dim, a.kv_heads or a.heads
    meta = run_meta(H=H, Hkv=Hkv, D=D, block=a.block, topk=a.topk, rounds=a.rounds)
    records = []
    for T in [int(t) for t in a.seqlens.split(",")]:
        for r in bench_rounds(a.backends.split(","), T, (H, Hkv, D, a.block, a.topk), a.rounds,
                              a.warmup, a.rep, meta["skipped"]):
            records.append(r)
            print(f"{r['backend']:10s} T={T:6d} fwd {r['fwd_ms']:8.3f} ms  fwd+bwd "
                  f"{r['fwdbwd_ms']:8.3f} ms  peak {r['peak_mib']:8.1f} MiB", flush=True)
        write_outputs(a.out, records, meta, quiet=True)  # partial results survive a crash
    write_outputs(a.out, records, meta)


if __name__ == "__main__":
    main()
