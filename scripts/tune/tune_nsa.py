#!/usr/bin/env python
"""Launch-config sweeps of the NSA kernels on the GPU (how the constants in attn/nsa/select.py,
attn/nsa/slc.py and attn/nsa/slc_dkdv.py were chosen; results in docs/nsa_notes.md).

    python3 scripts/tune/tune_nsa.py --out OUT [--what select,slc,dkdv] [--seqlens 16384,65536]
        [--heads 64,16 --kv-heads 4,4] [--shared]

  select  select_blocks over (GPU_ROWS, GPU_WARPS, GPU_STAGES); also counts the (query, head)
          rows whose chosen set differs from the first config's (near-tie rounding)
  slc     slc_attn forward and the dQ kernel over (FWD_ROWS, FWD_WARPS, FWD_STAGES) and
          (FWD_ROWS, DQ_WARPS, DQ_STAGES)
  dkdv    slc_attn_bwd (delta, dQ, index, dK/dV) over (DKDV_ROWS, DKDV_WARPS, DKDV_STAGES,
          SPLIT_FACTOR)
  tiles   slc forward and dQ with TILES = coarse / fine / adaptive while a fraction f of the
          queries (f in --share-fracs) take their 64-query block's first selection; reports the
          mean union sizes per coarse tile and per its fine tiles and the share of fine tiles
          (how COARSE_STEP_COST / FINE_STEP_COST in attn/nsa/slc.py were checked)
Inputs: random q, k, v (bf16, D = 128), mean-pooled compression 32 / 16, top-16 of 64-key blocks
chosen by our selection; --shared makes the 64 queries of a block use the first one's selection
(what a trained model's neighbouring queries mostly do). Module constants are rebound per config
and restored. Writes OUT/nsa_sweep.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

SELECT_CFGS = [(64, 4, 3), (128, 4, 3), (128, 8, 2), (128, 8, 3)]
SLC_FWD_CFGS = [(64, 4, 3), (64, 4, 2), (16, 4, 3), (128, 8, 3)]
SLC_DQ_CFGS = [(64, 4, 1), (64, 4, 2), (16, 4, 2), (128, 8, 1)]
DKDV_CFGS = [(64, 4, 2, 4), (64, 4, 3, 4), (64, 8, 2, 4), (32, 4, 2, 4), (64, 4, 2, 2)]
DEVICE = "cuda"  # (a CPU smoke run under TRITON_INTERPRET=1 sets "cpu")


def _rebound(mod, values):
    """Set module constants, returning their old values."""
    old = {k: getattr(mod, k) for k in values}
    for k, v in values.items():
        setattr(mod, k, v)
    return old


def inputs(T, H, Hkv, shared):
    from attn.common.documents import block_table
    from attn.nsa import compress
    from attn.nsa.cmp import cmp_attn
    from attn.nsa.select import select_blocks
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, T, h, 128, device=DEVICE, dtype=torch.bfloat16)
               for h in (H, Hkv, Hkv))
    kc, vc = compress(k, v, 32, 16)
    lse_c = cmp_attn(q, kc, vc, scale=128 ** -0.5, cmp_block=32, cmp_stride=16)[1]
    table = block_table(None, T, 64, q.device)
    kw = dict(scale=128 ** -0.5, cmp_block=32, cmp_stride=16, sel_block=64, topk=16)
    sel = select_blocks(q, kc, lse_c, table, **kw)
    if shared:
        sel = sel[:, (torch.arange(T, device=DEVICE) // 64) * 64].contiguous()
    return q, k, v, kc, lse_c, table, kw, sel


def sweep_tiles(T, H, Hkv, fracs, bench):
    from attn.nsa import slc
    q, k, v, kc, lse_c, table, kw, sel_random = inputs(T, H, Hkv, False)
    scale, res = kw["scale"], {}
    lead = sel_random[:, (torch.arange(T, device=DEVICE) // 64) * 64]
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    do = torch.randn_like(q)
    for f in fracs:
        follow = torch.rand(1, T, 1, 1, device=DEVICE, generator=gen) < f
        sel = torch.where(follow, lead, sel_random).contiguous()
        o, lse = slc.slc_attn_fwd(q, k, v, sel, table[2], table[3], scale=scale, sel_block=64)
        plans = slc._tile_plans(q, k, sel, table[2], table[3])
        row = {}
        if len(plans) == 2:
            (_, uc, flags, _, per, _), (_, uf, *_) = plans
            row.update(u_coarse=uc[3].float().mean().item(),
                       u_fine_sum=uf[3].float().mean().item() * per,
                       fine_share=flags.float().mean().item())
        dq = torch.empty_like(q)
        for tiles in ("coarse", "fine", "adaptive"):
            old = _rebound(slc, dict(TILES=tiles))
            row[f"fwd_{tiles}"] = bench(lambda: slc.slc_attn_fwd(
                q, k, v, sel, table[2], table[3], scale=scale, sel_block=64))
            row[f"dq_{tiles}"] = bench(lambda: slc._launch_rows(
                q, k, v, dq, lse, do, lse, sel, table[2], table[3], scale, 64, 0, True))
            _rebound(slc, old)
        res[f"share{f:g}"] = row
    return res


def sweep_one(what, T, H, Hkv, shared, bench):
    from attn.nsa import select, slc, slc_dkdv
    q, k, v, kc, lse_c, table, kw, sel = inputs(T, H, Hkv, shared)
    scale = kw["scale"]
    res = {}
    if what == "select":
        first = None
        for rows, w, st in SELECT_CFGS:
            old = _rebound(select, dict(GPU_ROWS=rows, GPU_WARPS=w, GPU_STAGES=st))
            fn = lambda: select.select_blocks(q, kc, lse_c, table, **kw)  # noqa: E731
            t, got = bench(fn), torch.sort(fn(), -1).values
            first = got if first is None else first
            res[f"rows{rows}_w{w}_s{st}"] = dict(
                ms=t, rows_differing=(got != first).any(-1).float().mean().item())
            _rebound(select, old)
    elif what == "slc":
        o, lse = slc.slc_attn_fwd(q, k, v, sel, table[2], table[3], scale=scale, sel_block=64)
        do = torch.randn_like(q)
        for rows, w, st in SLC_FWD_CFGS:
            old = _rebound(slc, dict(FWD_ROWS=rows, FWD_WARPS=w, FWD_STAGES=st))
            res[f"fwd_rows{rows}_w{w}_s{st}"] = bench(lambda: slc.slc_attn_fwd(
                q, k, v, sel, table[2], table[3], scale=scale, sel_block=64))
            _rebound(slc, old)
        dq = torch.empty_like(q)
        for rows, w, st in SLC_DQ_CFGS:
            old = _rebound(slc, dict(FWD_ROWS=rows, DQ_WARPS=w, DQ_STAGES=st))
            res[f"dq_rows{rows}_w{w}_s{st}"] = bench(lambda: slc._launch_rows(
                q, k, v, dq, lse, do, lse, sel, table[2], table[3], scale, 64, 0, True))
            _rebound(slc, old)
    elif what == "dkdv":
        o, lse = slc.slc_attn_fwd(q, k, v, sel, table[2], table[3], scale=scale, sel_block=64)
        do = torch.randn_like(q)
        for rows, w, st, sf in DKDV_CFGS:
            old = _rebound(slc_dkdv, dict(DKDV_ROWS=rows, DKDV_WARPS=w, DKDV_STAGES=st,
                                          SPLIT_FACTOR=sf))
            res[f"bwd_rows{rows}_w{w}_s{st}_split{sf}"] = bench(lambda: slc.slc_attn_bwd(
                do, q, k, v, o, lse, sel, table[2], table[3], scale=scale, sel_block=64))
            _rebound(slc_dkdv, old)
    else:
        raise SystemExit(f"--what: unknown sweep {what!r} (select, slc, dkdv)")
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--what", default="select,slc,dkdv")
    ap.add_argument("--seqlens", default="16384,65536")
    ap.add_argument("--heads", default="64,16", help="comma list, paired with --kv-heads")
    ap.add_argument("--kv-heads", default="4,4")
    ap.add_argument("--shared", action="store_true", help="blocks of 64 queries share picks")
    ap.add_argument("--share-fracs", default="0,0.5,0.75,0.9,1", help="tiles: sharing fractions")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("tune_nsa.py needs a CUDA GPU")
    import triton
    from triton.testing import do_bench
    bench = lambda f: do_bench(f, warmup=25, rep=100)  # noqa: E731
    out = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
               triton=triton.__version__, shared=a.shared, results={})
    os.makedirs(a.out, exist_ok=True)
    pairs = list(zip(map(int, a.heads.split(",")), map(int, a.kv_heads.split(","))))
    for what in a.what.split(","):
        for H, Hkv in pairs:
            for T in map(int, a.seqlens.split(",")):
                if what == "tiles":
                    fr = [float(x) for x in a.share_fracs.split(",")]
                    r = sweep_tiles(T, H, Hkv, fr, bench)
                else:
                    r = sweep_one(what, T, H, Hkv, a.shared, bench)
                out["results"][f"{what}@T={T},Hq={H},Hkv={Hkv}"] = r
                for name, val in r.items():
                    if what == "tiles":
                        print(f"tiles  T={T:6d} Hq={H:3d}/{Hkv}: {name:10s} " + " ".join(
                            f"{k}={x:.3f}" for k, x in val.items()), flush=True)
                        continue
                    ms = val["ms"] if isinstance(val, dict) else val
                    print(f"{what:6s} T={T:6d} Hq={H:3d}/{Hkv}: {name:28s} {ms:8.3f} ms",
                          flush=True)
                with open(os.path.join(a.out, "nsa_sweep.json"), "w") as f:
                    json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
