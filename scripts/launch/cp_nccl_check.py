"""Context parallelism under NCCL at the attention layer, one torchrun launch (issue 8):
    torchrun --standalone --nproc_per_node N scripts/launch/cp_nccl_check.py --out OUT
For every family × strategy it supports (zigzag layout; packed documents except for ring):
  equivalence  one layer's output, dx and every parameter gradient on the cp ranks against the
               same layer run on one GPU over the whole sequence (bf16 autocast, as train.py);
  scaling      forward+backward time of the layer on its shard, `--tokens` tokens per GPU, against
               one GPU running the whole world·tokens sequence:
               efficiency = t_one_gpu / (world · t_cp), i.e. per-GPU throughput relative to one GPU
               on the same sequence (ring-flash-attn's measure; for causal attention the same
               sequence is world² more work than one shard, so this is weak scaling per FLOP).
A case that stalls dumps every thread's stack (faulthandler) and ends the run, so a hang
names its line. Writes OUT/cp_nccl.json and OUT/cp_nccl.md from rank 0.
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root
from attn import get_core  # noqa: E402
from models.rope import Rotary  # noqa: E402
from parallel.context import STRATEGIES, CPSettings, apply_context_parallel  # noqa: E402
from parallel.dist import DistInfo  # noqa: E402
from parallel.mesh import build_mesh  # noqa: E402
from parallel.sharding import local_indices  # noqa: E402


SMOKE_OPTS = {"moba": {"block_size": 16}, "nsa": {"cmp_block": 8, "cmp_stride": 4, "sel_block": 8, "window": 16}}


class _Holder(torch.nn.Module):  # apply_context_parallel walks model.layers[i].attn
    def __init__(self, core):
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Module()])
        self.layers[0].attn = core


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


DEV = torch.device("cuda")  # --cpu-smoke: cpu and gloo, fp32, to check the script itself


def make_core(family, dim, heads, kv_heads, seed, **opts):
    torch.manual_seed(seed)
    hkv = heads if family in ("linear", "lightning") else kv_heads
    return get_core(family)(dim, heads, hkv, layer_idx=1, n_layers=4, **opts).to(DEV)


def fwd_bwd(core, x, w, rot, cu):
    with torch.autocast(DEV.type, dtype=torch.bfloat16, enabled=DEV.type == "cuda"):
        y = core(x, rot, cu)
    (y.float() * w).sum().backward()
    return y


def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, reps, group=None):
    """Median ms of fn over reps after one warm-up (which also autotunes), ranks in step."""
    fn()
    times = []
    for _ in range(reps):
        if group is not None:
            dist.barrier(group)
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def documents(total, docs, device):
    if not docs:
        return torch.tensor([0, total], dtype=torch.int32, device=device)
    cuts = sorted({0, total, total // 7, total // 3 + 1, total // 3 + 2, (4 * total) // 5})
    return torch.tensor(cuts, dtype=torch.int32, device=device)


def positions(cu, total, device):
    pos = torch.arange(total, device=device)
    doc = torch.searchsorted(cu[1:-1].long(), pos, right=True)
    return (pos - cu[doc].long())[None]


def run_case(mesh, family, strategy, a, rank, world):
    dev = DEV
    docs = strategy != "ring"
    out = {"family": family, "strategy": strategy, "documents": docs}
    # equivalence at a.eq_tokens tokens in all
    total = a.eq_tokens
    opts = SMOKE_OPTS.get(family, {}) if DEV.type == "cpu" else {}
    core = make_core(family, a.dim, a.heads, a.kv_heads, 0, **opts)
    ref = make_core(family, a.dim, a.heads, a.kv_heads, 0, **opts)
    ref.load_state_dict(core.state_dict())
    g = torch.Generator(device=dev).manual_seed(1)
    x = torch.randn(1, total, a.dim, device=dev, generator=g)
    w = torch.randn(1, total, a.dim, device=dev, generator=g)
    cu = documents(total, docs, dev)
    pos = positions(cu, total, dev)
    rot = Rotary(core.head_dim).to(dev)
    xr = x.clone().requires_grad_()
    y = fwd_bwd(ref, xr, w, rot.bind(pos), cu)
    apply_context_parallel(_Holder(core), mesh, CPSettings(mesh.cp, strategy, "zigzag"))
    idx = local_indices(total, mesh.cp, mesh.cp_rank, "zigzag").to(dev)
    xl = x[:, idx].clone().requires_grad_()
    yl = fwd_bwd(core, xl, w[:, idx], rot.bind(pos[:, idx]), cu)
    errs = {"out": rel(yl, y[:, idx]), "dx": rel(xl.grad, xr.grad[:, idx])}
    for (name, p), pr in zip(core.named_parameters(), ref.parameters()):
        grad = p.grad.clone()
        dist.all_reduce(grad, group=mesh.cp_group)
        errs[f"d{name}"] = rel(grad, pr.grad)
    t = torch.tensor([max(errs.values())], device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    out["max_rel_err"], out["errors_rank0"] = t.item(), errs
    # scaling at a.tokens tokens per GPU
    total = a.tokens * world
    x = torch.randn(1, total, a.dim, device=dev, generator=g)
    w = torch.randn(1, total, a.dim, device=dev, generator=g)
    cu = documents(total, docs, dev)
    pos = positions(cu, total, dev)
    idx = local_indices(total, mesh.cp, mesh.cp_rank, "zigzag").to(dev)
    xs, ws, ps = x[:, idx].clone().requires_grad_(), w[:, idx].contiguous(), pos[:, idx].contiguous()
    out["cp_ms"] = timed(lambda: fwd_bwd(core, xs, ws, rot.bind(ps), cu), a.reps, mesh.cp_group)
    del xs
    xr = x.clone().requires_grad_()
    out["one_gpu_ms"] = timed(lambda: fwd_bwd(ref, xr, w, rot.bind(pos), cu), a.reps)
    out["efficiency"] = out["one_gpu_ms"] / (world * out["cp_ms"])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/cp_nccl")
    ap.add_argument("--families", default="flash,sdpa,linear,lightning,moba,nsa")
    ap.add_argument("--strategies", default="ring,allgather,lasp,ulysses")
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--eq-tokens", type=int, default=16384, help="whole sequence, equivalence")
    ap.add_argument("--tokens", type=int, default=32768, help="tokens per GPU, scaling")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--stall-s", type=int, default=240, help="a case longer than this is a hang")
    ap.add_argument("--cpu-smoke", action="store_true")
    a = ap.parse_args()
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    global DEV
    if a.cpu_smoke:
        DEV = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timedelta(seconds=a.stall_s + 60))
    else:
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", timeout=timedelta(seconds=a.stall_s + 60),
                                device_id=torch.device("cuda", local))
    mesh = build_mesh(DistInfo(rank, world, local), world, 1, DEV.type)
    results = []
    for family in a.families.split(","):
        for strategy in a.strategies.split(","):
            caps = get_core(family).cp_capabilities
            if not caps & set(STRATEGIES.get(strategy, ())):
                continue
            faulthandler.dump_traceback_later(a.stall_s, exit=True)
            t0 = time.time()
            r = run_case(mesh, family, strategy, a, rank, world)
            faulthandler.cancel_dump_traceback_later()
            r["case_s"] = round(time.time() - t0, 1)
            results.append(r)
            if rank == 0:
                print(f"{family:9s} {strategy:9s} max rel err {r['max_rel_err']:.2e}  cp {r['cp_ms']:8.2f} ms  "
                      f"1 GPU {r['one_gpu_ms']:8.2f} ms  efficiency {r['efficiency']:.3f}  ({r['case_s']} s)",
                      flush=True)
            torch.cuda.empty_cache()
    if rank == 0:
        os.makedirs(a.out, exist_ok=True)
        gpu = DEV.type == "cuda"
        meta = {"card": torch.cuda.get_device_name() if gpu else "cpu", "world": world, "torch": torch.__version__,
                "nccl": ".".join(map(str, torch.cuda.nccl.version())) if gpu else "- (gloo)", "args": vars(a)}
        json.dump({"meta": meta, "cases": results}, open(os.path.join(a.out, "cp_nccl.json"), "w"), indent=1)
        md = [f"{meta['card']} × {world}, torch {meta['torch']}, NCCL {meta['nccl']}; layer dim {a.dim}, "
              f"{a.heads} heads ({a.kv_heads} KV heads; linear families all), bf16 autocast, zigzag",
              "", f"| family | strategy | documents | max rel. err (out, dx, params) | cp ms "
              f"({a.tokens} tok/GPU) | 1 GPU ms ({a.tokens * world} tok) | efficiency |",
              "|---|---|---|---:|---:|---:|---:|"]
        md += [f"| {r['family']} | {r['strategy']} | {'yes' if r['documents'] else 'no'} | {r['max_rel_err']:.2e} | "
               f"{r['cp_ms']:.2f} | {r['one_gpu_ms']:.2f} | {r['efficiency']:.3f} |" for r in results]
        open(os.path.join(a.out, "cp_nccl.md"), "w").write("\n".join(md) + "\n")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
