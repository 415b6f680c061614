#!/usr/bin/env python
"""MoBA per-stage times and launch-config sweep on the GPU (what scripts/bench/bench_moba.py's
total is made of).

    python3 scripts/tune/tune_moba.py --out OUT [--seqlens 16384,65536] [--sweep [--kernels K,...]]

Stages, each timed alone (median ms, triton.testing.do_bench) on the inputs of one forward:
  table      block table (torch ops)
  gate       select_blocks: mean pooling + streaming top-(k−1) (attn/moba/gate.py)
  index      routed_entries_triton: inverse index (index.py; index_torch: the torch sort version)
  routed_fwd routed.py forward (gathered rows attend their chosen blocks)
  tile_fwd   fwd.py tile kernel (own block + merge), given the routed partials
  fwd        moba_fwd total
  routed_dq  routed.py dQ partials;  tile_dq  fwd.py tile kernel in dQ mode
  dkdv       bwd.py dK/dV kernel;    bwd  moba_bwd total
--sweep times routed_fwd / routed_dq / tile kernels / dkdv over launch configs by rebinding the
module-level config constants (GPU_ROUTED, GPU_SPLIT, GPU_CFG, GPU_DKDV). Writes
moba_parts.json into --out; on Hopper it also times the Gluon dK/dV kernel alone
(dkdv_gluon.py) over (BLOCK_M, STAGES, producer warps) and the Gluon routed forward and dQ
(routed_gluon.py, routed_dq_gluon.py) over programs per (block, head); --kernels picks the
groups (gate, routed, tile, bwd, routed_gluon, routed_dq_gluon, dkdv_gluon). --once: one
forward + backward of the op at the first seqlen, no timing (a target for `ncu`:
scripts/gpu_session.sh moba-ncu).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root


def stage_times(T, H, Hkv, D, block, topk, warmup, rep):
    from triton.testing import do_bench
    from attn.common.softmax import _bwd_preprocess
    from attn.common.documents import block_table
    from attn.common.jit import LOG2E_F
    from attn.moba import fwd as mf, gate, op, routed
    torch.manual_seed(0)
    q = torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, T, Hkv, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, T, Hkv, D, device="cuda", dtype=torch.bfloat16)
    do = torch.randn_like(q)
    scale = D ** -0.5
    bench = lambda f: do_bench(f, warmup=warmup, rep=rep)  # noqa: E731
    r = {}
    r["table"] = bench(lambda: block_table(None, T, block, q.device))
    table = block_table(None, T, block, q.device)
    r["gate"] = bench(lambda: gate.select_blocks(q, k, table, topk, 0))
    sel = gate.select_blocks(q, k, table, topk, 0)
    nb = table[2].numel()
    r["gate_pool"] = bench(lambda: gate.pool_means(k, table))
    from attn.moba.index import routed_entries_triton
    r["index_torch"] = bench(lambda: routed.routed_entries(sel, nb))
    r["index"] = bench(lambda: routed_entries_triton(sel, nb))
    index = routed_entries_triton(sel, nb)
    nsel = sel.shape[-1]
    # no documents: MOBA_ROUTED_IMPL picks the routed forward as in the op
    r["routed_fwd"] = bench(lambda: routed.routed_fwd(q, k, v, index, table, scale * LOG2E_F,
                                                      nsel, block, False))
    r["fwd_after_gate"] = bench(lambda: mf.fwd_triton(q, k, v, sel, table, scale, 0, index,
                                                      block, False))
    r["tile_fwd"] = r["fwd_after_gate"] - r["routed_fwd"]
    r["fwd"] = bench(lambda: op.moba_fwd(q, k, v, block_size=block, topk=topk))
    o, lse, sel, table, index = op.moba_fwd(q, k, v, block_size=block, topk=topk)
    delta = torch.empty(1, H, T, device="cuda", dtype=torch.float32)
    _bwd_preprocess[(T // 64, H)](o, do, delta, T, H=H, HEAD_DIM=D, BLOCK_M=64)
    r["routed_dq"] = bench(lambda: routed.routed_dq(do, q, k, v, lse, delta, index, table,
                                                    scale * LOG2E_F, nsel, block, False))
    r["dq"] = bench(lambda: mf.dq_triton(do, q, k, v, lse, delta, sel, table, scale, 0, index,
                                         block, False))
    r["tile_dq"] = r["dq"] - r["routed_dq"]
    r["bwd"] = bench(lambda: op.moba_bwd(do, q, k, v, o, lse, sel, table, index, scale=scale,
                                         block_size=block))
    r["dkdv"] = r["bwd"] - r["dq"]
    return r, (q, k, v, do, o, lse, delta, sel, table, index, scale, nsel, block)


def sweep(args_pack, warmup, rep, kinds=None):
    """Times of each kernel over launch configs (module constants rebound, then restored);
    kinds: the groups to sweep (gate, routed, tile, bwd, routed_gluon, routed_dq_gluon,
    dkdv_gluon), None for all."""
    from triton.testing import do_bench
    from attn.common.jit import LOG2E_F
    from attn.moba import bwd as mb, fwd as mf, gate, routed
    q, k, v, do, o, lse, delta, sel, table, index, scale, nsel, block = args_pack
    bench = lambda f: do_bench(f, warmup=warmup, rep=rep)  # noqa: E731
    out = []

    def run(kind, cfg, f):
        try:
            ms = bench(f)
        except Exception as e:  # noqa: BLE001 (a config that does not compile: record why)
            ms = f"{type(e).__name__}: {str(e)[:120]}"
        out.append({"kernel": kind, "cfg": list(cfg), "ms": ms})
        print(kind, cfg, ms, flush=True)

    def want(kind):
        return kinds is None or kind in kinds

    for cfg in [(128, 32, 8, 3), (128, 32, 8, 2), (128, 32, 8, 1), (128, 32, 4, 2),
                (64, 32, 4, 2), (64, 32, 4, 1), (256, 32, 8, 2), (128, 64, 8, 2)] * want("gate"):
        keep_gate, gate.GPU_TOPK = gate.GPU_TOPK, cfg
        run("gate", cfg, lambda: gate.select_blocks(q, k, table, nsel + 1, 0))
        gate.GPU_TOPK = keep_gate
    keep = (routed.GPU_ROUTED, routed.GPU_SPLIT, dict(mf.GPU_CFG), mb.GPU_DKDV)
    for bm, bn, w, s in [(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2)] * want("routed"):
        for split in (4,):
            routed.GPU_ROUTED, routed.GPU_SPLIT = (bm, bn, w, s), split
            run("routed_fwd", (bm, bn, w, s, split), lambda: routed.routed_fwd(
                q, k, v, index, table, scale * LOG2E_F, nsel, block))
            run("routed_dq", (bm, bn, w, s, split), lambda: routed.routed_dq(
                do, q, k, v, lse, delta, index, table, scale * LOG2E_F, nsel, block))
    routed.GPU_ROUTED, routed.GPU_SPLIT = keep[0], keep[1]
    op_, lp = routed.routed_fwd(q, k, v, index, table, scale * LOG2E_F, nsel)
    for cfg in [(64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 3)] * want("tile"):
        mf.GPU_CFG["fwd"] = mf.GPU_CFG["dq"] = cfg
        run("fwd_after_gate", cfg, lambda: mf.fwd_triton(q, k, v, sel, table, scale, 0, index,
                                                         block))
        run("dq", cfg, lambda: mf.dq_triton(do, q, k, v, lse, delta, sel, table, scale, 0,
                                            index, block))
    mf.GPU_CFG.update(keep[2])
    for cfg in [(32, 64, 4, 2), (32, 64, 4, 3), (64, 64, 4, 2), (64, 128, 8, 2), (32, 128, 8, 2),
                (64, 64, 8, 2)] * want("bwd"):
        mb.GPU_DKDV = cfg
        run("bwd", cfg, lambda: mb.bwd_triton(do, q, k, v, o, lse, sel, table, scale, 0, index,
                                              block, False))
    mb.GPU_DKDV = keep[3]
    # the Gluon routed forward (Hopper, in its scope): programs per (block, head)
    from attn.moba import routed_gluon as mr
    if (want("routed_gluon") or want("routed_dq_gluon")) and \
            torch.cuda.get_device_capability()[0] == 9 and \
            mr.routed_scope_error(q, k, block, False) is None:
        nb = table[2].numel()
        for split in (2, 4, 8) * want("routed_gluon"):
            run("routed_gluon", (split,), lambda: mr.routed_fwd_gluon(
                q, k, v, index, nb, nsel, scale * LOG2E_F, block, op_, lp, split))
        from attn.moba import routed_dq_gluon as md
        dqp = torch.empty_like(op_)
        for split in (2, 4, 8) * want("routed_dq_gluon"):
            run("routed_dq_gluon", (split,), lambda: md.routed_dq_gluon(
                do, q, k, v, lse, delta, index, nb, nsel, scale * LOG2E_F, block, dqp, split))
    # the Gluon dK/dV kernel (Hopper, in its scope): (BLOCK_M, STAGES, producer warps)
    from attn.moba import dkdv_gluon as mg
    if want("dkdv_gluon") and torch.cuda.get_device_capability()[0] == 9 and \
            mg.dkdv_scope_error(q, k, block, False, 0) is None:
        nb = table[2].numel()
        for bm, st, pw in [(64, 4, 1), (64, 4, 2), (64, 4, 4), (32, 6, 1), (32, 6, 4)]:
            run("dkdv_gluon", (bm, st, pw), lambda: mg.dkdv_gluon(
                do, q, k, v, lse, delta, index, nb, nsel, scale, block, bm, st, pw))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seqlens", default="16384,65536")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=None)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block", type=int, default=512)
    ap.add_argument("--topk", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=10, help="ms")
    ap.add_argument("--rep", type=int, default=50, help="ms")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--kernels", default=None,
                    help="--sweep: comma list of gate, routed, tile, bwd, routed_gluon, "
                         "routed_dq_gluon, dkdv_gluon (default all)")
    ap.add_argument("--once", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    a = ap.parse_args(argv)
    hkv = a.kv_heads or a.heads
    if a.once:
        from attn.moba import moba_attn
        T = int(a.seqlens.split(",")[0])
        q = torch.randn(1, T, a.heads, a.head_dim, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(1, T, hkv, a.head_dim, device="cuda", dtype=torch.bfloat16)
                for _ in range(2))
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        moba_attn(q, k, v, block_size=a.block, topk=a.topk).sum().backward()
        torch.cuda.synchronize()
        return
    os.makedirs(a.out, exist_ok=True)
    res = {"meta": {"device": torch.cuda.get_device_name(), "H": a.heads, "Hkv": hkv,
                    "D": a.head_dim, "block": a.block, "topk": a.topk}, "stages": {}, "sweep": {}}
    for T in [int(t) for t in a.seqlens.split(",")]:
        r, pack = stage_times(T, a.heads, hkv, a.head_dim, a.block, a.topk, a.warmup, a.rep)
        res["stages"][T] = r
        print(T, json.dumps({k: round(v, 3) for k, v in r.items()}), flush=True)
        if a.sweep:
            res["sweep"][T] = sweep(pack, a.warmup, a.rep,
                                    None if a.kernels is None else a.kernels.split(","))
        with open(os.path.join(a.out, "moba_parts.json"), "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
