"""Distribution applied from outside the model: the dp × cp mesh, context parallelism and the
data-parallel engines.

`parallel.engine` (configs/parallel/) picks an entry of ENGINES; `parallelize` builds the mesh,
wraps every attention core for context parallelism when parallel.cp > 1, then hands the model
to the engine, which returns the module the train loop calls.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from torch import nn

from parallel.context import apply_context_parallel
from parallel.dist import DistInfo, init_distributed
from parallel.mesh import Mesh, build_mesh
from parallel.sharding import shard_batch


@dataclass
class Parallelized:
    module: nn.Module          # what the train loop calls (possibly a DDP wrapper)
    model: nn.Module           # the bare model (state dicts, FLOPs)
    mesh: Mesh
    layout: str = "zigzag"     # context-parallel token layout
    cp_strategies: dict = field(default_factory=dict)  # layer index -> strategy (cp > 1)

    def no_sync(self, sync: bool):
        """Context: skip the gradient all-reduce on accumulation micro-steps."""
        if hasattr(self.module, "set_requires_gradient_sync"):  # FSDP2
            self.module.set_requires_gradient_sync(sync)
            return contextlib.nullcontext()
        if sync or not hasattr(self.module, "no_sync"):
            return contextlib.nullcontext()
        return self.module.no_sync()

    def shard(self, mb: dict) -> dict:
        """This rank's part of a micro-batch (identity without context parallelism)."""
        if self.mesh.cp == 1:
            return mb
        return shard_batch(mb, self.mesh.cp, self.mesh.cp_rank, self.layout)


def _single(model, info: DistInfo):
    if info.world > 1:
        raise ValueError(f"parallel=single but {info.world} processes were launched; "
                         "use parallel=ddp under torchrun")
    return model


def _ddp(model, info: DistInfo, bucket_cap_mb: int = 25):
    if info.world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel
    # gradients average over every rank: data-parallel peers and context-parallel peers (whose
    # parameters are replicated too); the train loop scales the loss to undo the averaging
    device_ids = [info.local_rank] if next(model.parameters()).is_cuda else None
    return DistributedDataParallel(model, device_ids=device_ids, bucket_cap_mb=bucket_cap_mb)


def _fsdp(model, info: DistInfo, param_dtype: str = "auto"):
    """FSDP2: parameters, gradients and optimizer state sharded over every rank, one unit per
    block plus the root (embedding, final norm, head). Gathers run in `param_dtype`
    (auto: bf16 on CUDA, fp32 on CPU); gradients reduce in fp32."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    if info.world == 1:
        return model
    on_cuda = next(model.parameters()).is_cuda
    table = {"auto": torch.bfloat16 if on_cuda else torch.float32, "bf16": torch.bfloat16,
             "fp32": torch.float32}
    if param_dtype not in table:
        raise ValueError(f"parallel.param_dtype={param_dtype!r} must be auto, bf16 or fp32")
    mp = MixedPrecisionPolicy(param_dtype=table[param_dtype], reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp, reshard_after_forward=False)  # root is needed right after
    return model


ENGINES = {"single": lambda model, info, cfg: _single(model, info),
           "ddp": lambda model, info, cfg: _ddp(model, info, cfg.get("bucket_cap_mb", 25)),
           "fsdp": lambda model, info, cfg: _fsdp(model, info, cfg.get("param_dtype", "auto"))}


def parallelize(model: nn.Module, info: DistInfo, cfg, mesh: Mesh | None = None) -> Parallelized:
    engine = cfg.engine
    if engine not in ENGINES:
        raise ValueError(f"parallel.engine={engine!r} is unknown; valid: {', '.join(ENGINES)}")
    if mesh is None:
        mesh = build_mesh(info, int(cfg.get("cp", 1)))
    layout = cfg.get("cp_layout", "zigzag")
    chosen = {}
    if mesh.cp > 1:
        chosen = apply_context_parallel(model, mesh, cfg.get("cp_strategy", "auto"), layout)
    return Parallelized(ENGINES[engine](model, info, cfg), model, mesh, layout, chosen)


__all__ = ["DistInfo", "ENGINES", "Mesh", "Parallelized", "build_mesh", "init_distributed",
           "parallelize"]
