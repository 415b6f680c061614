"""Worker side of the context-parallel tests: each spawned rank runs every case and asserts
that its outputs and gradients equal the single-process run (computed in the same process
from the same seed). Imported by test_context_parallel.py; run under gloo on CPU."""
from __future__ import annotations

import copy
import os
import traceback

import torch
import torch.distributed as dist

from attn import get_core
from models import ModelConfig, Transformer
from models.rope import Rotary
from parallel import parallelize
from parallel.engines import single
from parallel.context import STRATEGIES, CPSettings, apply_context_parallel, strategy_for
from parallel.dist import DistInfo
from parallel.mesh import build_mesh
from parallel.sharding import flatten_rows, local_indices, shard_batch

RTOL = 1e-5  # fp32: CP reorders sums (all-gather/reduce-scatter, state prefix), nothing else


class _Holder(torch.nn.Module):
    def __init__(self, core):
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Module()])
        self.layers[0].attn = core


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def doc_positions(cu, total):
    pos = torch.arange(total)
    starts = torch.zeros(total, dtype=torch.long)
    starts[cu[:-1].long()] = 1
    doc = torch.cumsum(starts, 0) - 1
    return pos - cu[doc].long()


def core_case(mesh, family, strategy, layout, docs, seed, opts=None):
    """One attention layer: output, dx and every parameter gradient, CP vs single process."""
    torch.manual_seed(seed)
    dim, hq, total = 64, 8, 48
    hkv = hq if family in ("linear", "lightning") else hq // 2  # GQA groups of 2 where supported
    core = get_core(family)(dim, hq, hkv, layer_idx=1, n_layers=3, **(opts or {}))
    x = torch.randn(1, total, dim)
    w = torch.randn(1, total, dim)
    if strategy == "ring" and docs:
        return  # ring serves one document per micro-batch (allgather covers documents)
    cu = (torch.tensor([0, 5, 6, 29, 48], dtype=torch.int32) if docs
          else torch.tensor([0, 48], dtype=torch.int32))
    pos = doc_positions(cu, total)[None]
    rotary = Rotary(core.head_dim)

    ref_core = copy.deepcopy(core)
    xr = x.clone().requires_grad_()
    y = ref_core(xr, rotary.bind(pos), cu)
    (y * w).sum().backward()

    chosen = apply_context_parallel(_Holder(core), mesh,
                                    CPSettings(mesh.cp, strategy, layout, mesh.ulysses))[0]
    picked, u = strategy_for(core, strategy), mesh.ulysses
    want = ("ulysses" if picked == "ulysses" or u == mesh.cp else
            picked if u == 1 else f"ulysses+{picked}")
    assert chosen == want, (chosen, want)
    idx = local_indices(total, mesh.cp, mesh.cp_rank, layout)
    xl = x[:, idx].clone().requires_grad_()
    yl = core(xl, rotary.bind(pos[:, idx]), cu)
    (yl * w[:, idx]).sum().backward()

    tag = f"{family}/{strategy}/{layout}/docs={docs}/ulysses={mesh.ulysses} rank {mesh.cp_rank}"
    assert rel_err(yl, y[:, idx]) < RTOL, (tag, "out", rel_err(yl, y[:, idx]))
    assert rel_err(xl.grad, xr.grad[:, idx]) < RTOL, (tag, "dx", rel_err(xl.grad, xr.grad[:, idx]))
    for (name, p), pr in zip(core.named_parameters(), ref_core.parameters()):
        g = p.grad.clone()
        dist.all_reduce(g, group=mesh.cp_group)  # each rank holds its tokens' share
        assert rel_err(g, pr.grad) < RTOL, (tag, name, rel_err(g, pr.grad))


def model_case(mesh, info, pattern, layout, seed):
    """A whole (hybrid) model: loss and all parameter gradients, cp ranks vs one process."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=len(pattern), n_heads=4, n_kv_heads=4,
                      layer_pattern=pattern, loss_chunk=16)
    model = Transformer(cfg)
    ref = copy.deepcopy(model)
    B, T = 2, 24
    ids = torch.randint(0, 64, (B, T + 1))
    mb = {"input_ids": ids[:, :-1], "labels": ids[:, 1:],
          "positions": torch.tensor([list(range(10)) + list(range(14)), list(range(24))]),
          "cu_seqlens": torch.tensor([0, 10, 24, 48], dtype=torch.int32)}
    flat = flatten_rows(mb)
    s, n = ref(flat["input_ids"], flat["positions"], flat["labels"], flat["cu_seqlens"])
    (s / n).backward()

    par = parallelize(model, DistInfo(), single, mesh, CPSettings(mesh.cp, "auto", layout, mesh.ulysses))
    loc = shard_batch(mb, mesh.cp, mesh.cp_rank, layout)
    sl, nl = par.module(loc["input_ids"], loc["positions"], loc["labels"], loc["cu_seqlens"])
    (sl / n).backward()
    tot = sl.detach().clone()
    dist.all_reduce(tot, group=mesh.cp_group)
    assert abs(tot.item() / n.item() - (s / n).item()) < RTOL * abs((s / n).item()), (pattern, "loss")
    for (name, p), pr in zip(model.named_parameters(), ref.parameters()):
        g = p.grad.clone()
        dist.all_reduce(g, group=mesh.cp_group)
        assert rel_err(g, pr.grad) < RTOL, (pattern, layout, mesh.ulysses, name, rel_err(g, pr.grad))


def worker(rank, world, init_file, cases, err_file):
    """Cases are (kind, ulysses degree, *args) with kind "core" (core_case) or "model"; every
    case splits one sequence over all `world` ranks (cp = world)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        # every rank builds the same meshes in the same order (new_group is collective)
        meshes = {u: build_mesh(DistInfo(rank, world, rank), world, u, "cpu")
                  for u in sorted({case[1] for case in cases})}
        for kind, u, *args in cases:
            mesh = meshes[u]
            if kind == "core":
                core_case(mesh, *args)
            else:
                model_case(mesh, DistInfo(rank, world, rank), *args)
    except BaseException:
        with open(f"{err_file}.{rank}", "w") as f:
            f.write(traceback.format_exc())
        raise
    else:
        dist.barrier()  # no rank tears gloo down while a peer still has sends in flight
    finally:
        dist.destroy_process_group()


def run_workers(world, cases, tmp_path):
    """Spawn `world` gloo ranks running `cases`; fail with the ranks' tracebacks."""
    import pytest
    import torch.multiprocessing as mp
    err = tmp_path / "err"
    try:
        mp.start_processes(worker, args=(world, str(tmp_path / "init"), cases, str(err)),
                           nprocs=world, start_method="spawn")
    except Exception as e:
        msgs = [open(f"{err}.{r}").read() for r in range(world) if os.path.exists(f"{err}.{r}")]
        pytest.fail("\n".join(msgs) or str(e))


def servable(family: str) -> list[str]:
    """The strategies the family's core declares capabilities for (attn/base.py)."""
    caps = get_core(family).cp_capabilities
    return [s for s, needs in STRATEGIES.items() if caps & set(needs)]
