#!/usr/bin/env python
"""NSA benchmark: our three-branch Triton NSA against fla's two-branch NSA and full attention.

    python3 scripts/bench/bench_nsa.py --out OUT [--seqlens 16384,65536] [--heads 64 --kv-heads 4]
        [--inputs random|local]

Shapes: B = 1, Hq = --heads, Hkv = --kv-heads, D = 128, bf16. Backends:
  nsa         attn.nsa.nsa_attn, the paper's layer: compression blocks 32 every 16 keys (mean
              pooling, inside the timed region), top-16 selection blocks of 64, window 512,
              three gates; selection (scores + top-n) inside the timed region
  nsa_b64     the same with fla's geometry for the compressed branch (blocks of 64 every 64)
  nsa_b64_2br nsa_b64 without the window branch (window=0, two gates): the work fla_nsa does,
              like for like
  fla_nsa     fla 0.6 parallel_nsa, compression + selection (its window branch needs flash-attn):
              mean pooling blocks of 64, top-16 blocks of 64; needs Hq/Hkv >= 16
  flash       attn.flash.flash_attn, full causal attention (our kernel)
  sdpa_cudnn, sdpa_flash   torch SDPA full causal attention (cuDNN, FlashAttention-2), GQA
Times: medians of triton.testing.do_bench in ms, fwd and fwd+bwd; peak memory: the
torch.cuda.max_memory_allocated increase over the inputs during one fwd+bwd. Writes
bench_nsa.json and bench_nsa.md into --out.

`--parts` times our layer's stages one by one instead (same shapes, paper geometry and the 64/64
one): compress, compressed attention, selection, selected-block attention, window, gate mix;
fwd and fwd+bwd where differentiable. Writes bench_nsa_parts.json / .md.
"""
from __future__ import annotations

import argparse
import os

import torch

from harness import md_table, require_cuda, run_guarded, run_meta, seq_label, skipped_line, \
    time_fwd_bwd, write_report


INPUTS = "random"  # --inputs


def _queries(T, H, D):
    """random: iid Gaussian queries (every query picks unrelated blocks: the selected branch's
    worst case). local: query t = 0.8·z[t // 64] + 0.6·n[t] (unit variance), so the 64 queries of
    a block lean the same way and mostly pick the same blocks, as a trained model's neighbours
    tend to; keys and values stay random."""
    if INPUTS == "random":
        return torch.randn(1, T, H, D, device="cuda")
    z = torch.randn(1, -(-T // 64), H, D, device="cuda").repeat_interleave(64, 1)[:, :T]
    return 0.8 * z + 0.6 * torch.randn(1, T, H, D, device="cuda")


def _qkv(T, H, Hkv, D, layout="bthd"):
    torch.manual_seed(1234)
    dt = torch.bfloat16
    q = _queries(T, H, D).to(dt)
    k = torch.randn(1, T, Hkv, D, device="cuda", dtype=dt)
    v = torch.randn(1, T, Hkv, D, device="cuda", dtype=dt)
    if layout == "bhtd":
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    return [q, k, v]


def _gates(T, H):
    return [torch.rand(1, T, H, device="cuda", dtype=torch.bfloat16) for _ in range(3)]


def make_nsa(T, H, Hkv, D, cmp_block=32, cmp_stride=16, window=512):
    from attn.nsa import compress, nsa_attn

    def fn(q, k, v, g1, g2, g3=None):
        kc, vc = compress(k, v, cmp_block, cmp_stride)
        return nsa_attn(q, k, v, kc, vc, g1, g2, g3, cmp_block=cmp_block, cmp_stride=cmp_stride,
                        sel_block=64, topk=16, window=window,
                        gates_nonneg=True)  # sigmoid-like gates in [0, 1): no check (host sync)
    return fn, _qkv(T, H, Hkv, D) + _gates(T, H)[:3 if window else 2]


def make_nsa_b64(T, H, Hkv, D):
    return make_nsa(T, H, Hkv, D, 64, 64)


def make_nsa_b64_2br(T, H, Hkv, D):
    return make_nsa(T, H, Hkv, D, 64, 64, window=0)


def make_fla_nsa(T, H, Hkv, D):
    from fla.ops.nsa import parallel_nsa
    g = _gates(T, H)

    def fn(q, k, v, g1, g2):
        return parallel_nsa(q, k, v, g1, g2, None, block_counts=16, block_size=64,
                            window_size=0)
    return fn, _qkv(T, H, Hkv, D) + g[:2]


def make_flash(T, H, Hkv, D):
    from attn.flash import flash_attn
    return flash_attn, _qkv(T, H, Hkv, D)


def _sdpa(backend_name):
    def make(T, H, Hkv, D):
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel
        backend = getattr(SDPBackend, backend_name)

        def fn(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                      enable_gqa=H != Hkv)
        return fn, _qkv(T, H, Hkv, D, "bhtd")
    return make


BACKENDS = {"nsa": make_nsa, "nsa_b64": make_nsa_b64, "nsa_b64_2br": make_nsa_b64_2br,
            "fla_nsa": make_fla_nsa,
            "flash": make_flash, "sdpa_cudnn": _sdpa("CUDNN_ATTENTION"),
            "sdpa_flash": _sdpa("FLASH_ATTENTION")}


def bench_one(name, T, H, Hkv, D, warmup, rep):
    fn, inputs = BACKENDS[name](T, H, Hkv, D)
    inputs = [t.requires_grad_() for t in inputs]
    return dict(backend=name, T=T, H=H, Hkv=Hkv, D=D, **time_fwd_bwd(fn, inputs, warmup, rep))


@torch.no_grad()
def _selection(q, k, v, cmp_block, cmp_stride):
    """The layer's compressed keys / values, compressed lse, block table and top-16 selection of
    64-key blocks for these inputs: (kc, vc, lse, table, sel), no autograd."""
    from attn.common.documents import block_table
    from attn.nsa import compress
    from attn.nsa.cmp import cmp_attn
    from attn.nsa.select import select_blocks
    kw = dict(scale=q.shape[-1] ** -0.5, cmp_block=cmp_block, cmp_stride=cmp_stride)
    kc, vc = compress(k, v, cmp_block, cmp_stride)
    lse = cmp_attn(q, kc, vc, **kw)[1]
    table = block_table(None, q.shape[1], 64, q.device)
    return kc, vc, lse, table, select_blocks(q, kc, lse, table, sel_block=64, topk=16, **kw)


def pick_share(T, H, Hkv, D):
    """Share of the nsa layer's selected blocks (top-16 of 64, compression 32 / 16) that the first
    query of the same 64-query block also selected: ~0.2 for random inputs, near 1 when
    neighbouring queries agree."""
    sel = _selection(*_qkv(T, H, Hkv, D), 32, 16)[-1]
    lead = sel[:, (torch.arange(T, device=sel.device) // 64) * 64]
    hit = (sel[..., :, None] == lead[..., None, :]).any(-1) & (sel >= 0)
    return (hit.sum() / (sel >= 0).sum()).item()


def bench_parts(T, H, Hkv, D, cmp_block, cmp_stride, warmup, rep):
    """{stage: (fwd_ms, fwdbwd_ms or None)} for one shape and compression geometry."""
    from triton.testing import do_bench

    from attn.flash import flash_attn
    from attn.nsa import compress
    from attn.nsa.cmp import cmp_attn
    from attn.nsa.gate_mix import gate_mix_bwd_folded
    from attn.nsa.select import select_blocks
    from attn.nsa.slc import slc_attn
    q, k, v = [t.requires_grad_() for t in _qkv(T, H, Hkv, D)]
    scale = D ** -0.5
    kc, vc, lse, table, sel = _selection(q, k, v, cmp_block, cmp_stride)
    kc, vc = kc.requires_grad_(), vc.requires_grad_()
    os_ = [torch.randn_like(q) for _ in range(3)]
    gates = torch.rand(1, T, H, 3, device="cuda", dtype=q.dtype)
    lses = [torch.randn(1, H, T, device="cuda") for _ in range(3)]
    do_mix = torch.randn_like(q)
    stages = {
        "compress": (lambda: compress(k, v, cmp_block, cmp_stride)[0], None),
        "cmp_attn": (lambda: cmp_attn(q, kc, vc, scale=scale, cmp_block=cmp_block,
                                      cmp_stride=cmp_stride)[0], [q, kc, vc]),
        "select": (lambda: select_blocks(q, kc, lse, table, scale=scale, cmp_block=cmp_block,
                                         cmp_stride=cmp_stride, sel_block=64, topk=16), None),
        "slc_attn": (lambda: slc_attn(q, k, v, sel, table[2], table[3], scale=scale,
                                      sel_block=64), [q, k, v]),
        "window": (lambda: flash_attn(q, k, v, scale=scale, window=512), [q, k, v]),
        # the gated sum's backward pass alone (its forward is slc_attn's epilogue in the layer)
        "mix_bwd": (lambda: gate_mix_bwd_folded(do_mix, *os_, gates, lses), None),
    }
    res = {}
    for name, (fn, grads) in stages.items():
        with torch.no_grad():
            fwd = do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
        both = None
        if grads is not None:
            do = torch.randn_like(fn())
            both = do_bench(lambda: fn().backward(do), warmup=warmup, rep=rep, grad_to_none=grads,
                            return_mode="median")
        res[name] = (fwd, both)
        print(f"  {name:9s} fwd {fwd:8.3f} ms" + ("" if both is None else
                                                    f"  fwd+bwd {both:8.3f} ms"), flush=True)
    return res


PART_NAMES = ["compress", "cmp_attn", "select", "slc_attn", "window", "mix_bwd"]


def main_parts(a, meta):
    rows = []
    pairs = list(zip([int(h) for h in a.heads.split(",")], [int(h) for h in a.kv_heads.split(",")]))
    for H, Hkv in pairs:
        for T in [int(t) for t in a.seqlens.split(",")]:
            for cb, cs in ((32, 16), (64, 64)):
                print(f"Hq={H} Hkv={Hkv} T={T} compression {cb}/{cs}", flush=True)
                res = run_guarded(meta["skipped"], "parts", f"T={T},Hq={H},{cb}/{cs}",
                                  lambda: bench_parts(T, H, Hkv, a.head_dim, cb, cs, a.warmup,
                                                      a.rep))
                if res is not None:
                    rows.append(dict(H=H, Hkv=Hkv, T=T, cmp=f"{cb}/{cs}", stages=res))
    table = []
    for r in rows:
        cells = [f"{r['stages'][n][0]:.2f}" + ("" if r["stages"][n][1] is None
                                               else f" / {r['stages'][n][1]:.2f}")
                 for n in PART_NAMES]
        table.append((f"Hq={r['H']} Hkv={r['Hkv']} T={r['T'] // 1024}k {r['cmp']}", cells))
    lines = [f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, {meta['date']}; "
             "ms, fwd / fwd+bwd; mix_bwd: the gated sum's backward pass (its forward runs in "
             "the selected branch's epilogue)", ""]
    lines += md_table("shape", PART_NAMES, table) + skipped_line(meta)
    write_report(a.out, "bench_nsa_parts", dict(meta=meta, results=rows),
                 "\n".join(lines) + "\n", quiet=False)


def write_outputs(out, records, meta, quiet=False):
    shapes = list(dict.fromkeys((r["H"], r["Hkv"]) for r in records))
    lines = [f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, {meta['date']}; "
             "B=1, D=128, bf16; nsa: compression 32/16 (mean), top-16 of 64-key blocks, window "
             "512, gates; nsa_b64: compression 64/64; nsa_b64_2br: that without the window "
             "branch; fla_nsa: compression + selection only "
             f"(blocks of 64, top-16). Inputs: {meta.get('inputs', 'random')}; share of the picks "
             "the first query of the same 64-query block also made: "
             + ", ".join(f"{k} {v:.2f}" for k, v in meta.get("pick_share", {}).items()), ""]
    for hq, hkv in shapes:
        rs = [r for r in records if (r["H"], r["Hkv"]) == (hq, hkv)]
        seqlens = sorted({r["T"] for r in rs})
        names = list(dict.fromkeys(r["backend"] for r in rs))
        for key, title in (("fwd_ms", "forward, ms"), ("fwdbwd_ms", "forward+backward, ms"),
                           ("peak_mib", "peak memory of one fwd+bwd, MiB")):
            rows = []
            for n in names:
                cells = []
                for t in seqlens:
                    r = [x for x in rs if x["backend"] == n and x["T"] == t]
                    cells.append(f"{r[0][key]:.2f}" if r else "-")
                rows.append((n, cells))
            lines += md_table(f"Hq={hq}, Hkv={hkv}: {title}", [seq_label(t) for t in seqlens],
                              rows)
    lines += skipped_line(meta)
    write_report(out, "bench_nsa", dict(meta=meta, results=records), "\n".join(lines) + "\n",
                 quiet)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backends",
                    default="nsa,nsa_b64,nsa_b64_2br,fla_nsa,flash,sdpa_cudnn,sdpa_flash")
    ap.add_argument("--seqlens", default="16384,65536")
    ap.add_argument("--heads", default="64", help="comma list, paired with --kv-heads")
    ap.add_argument("--kv-heads", default="4")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=25, help="ms")
    ap.add_argument("--rep", type=int, default=100, help="ms")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--parts", action="store_true", help="time the layer's stages one by one")
    ap.add_argument("--inputs", default="random", choices=["random", "local"],
                    help="query distribution (see _queries); local reports the pick share")
    a = ap.parse_args(argv)
    global INPUTS
    INPUTS = a.inputs
    require_cuda("bench_nsa.py")
    meta = run_meta(inputs=a.inputs, pick_share={})
    if a.parts:
        return main_parts(a, meta)
    records = []
    pairs = list(zip([int(h) for h in a.heads.split(",")], [int(h) for h in a.kv_heads.split(",")]))
    for H, Hkv in pairs:
        for T in [int(t) for t in a.seqlens.split(",")]:
            meta["pick_share"][f"T={T},Hq={H},Hkv={Hkv}"] = pick_share(T, H, Hkv, a.head_dim)
            for name in a.backends.split(","):
                r = run_guarded(meta["skipped"], name, f"T={T},Hq={H}", lambda: bench_one(
                    name, T, H, Hkv, a.head_dim, a.warmup, a.rep))
                if r is None:
                    continue
                records.append(r)
                print(f"{name:10s} Hq={H:3d} Hkv={Hkv:3d} T={T:6d} fwd {r['fwd_ms']:8.3f} ms  "
                      f"fwd+bwd {r['fwdbwd_ms']:8.3f} ms  peak {r['peak_mib']:8.1f} MiB",
                      flush=True)
                write_outputs(a.out, records, meta, quiet=True)  # partial results survive
    write_outputs(a.out, records, meta)


if __name__ == "__main__":
    main()
