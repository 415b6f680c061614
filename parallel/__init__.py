"""Distribution applied from outside the model: context parallelism, the per-block wrappers
and the data-parallel engines, over the dp × cp mesh (built once, parallel/mesh.py).

`parallelize` applies, in this order:
1. context parallelism (cp.size > 1): every attention core's `attend` is swapped for the
   strategy that serves it (parallel/context.py);
2. the per-block wrappers (parallel/wrappers.py): torch.compile of each block's forward, inside
   activation checkpointing, inside CPU offload of the checkpointed inputs;
3. the data-parallel engine: a callable `engine(model, info)` (parallel/engines.py: single,
   ddp, fsdp; parallel/deepspeed_engine.py; train.py builds it from the `parallel` group's
   `_target_` with Hydra), which returns the module the train loop calls, or a `Parallelized`
   of its own when it also owns backward, the optimizer step and the checkpointed state
   (DeepSpeed ZeRO). FSDP2 thus shards the wrapped blocks (torchtitan's order).

The train loop drives every engine through `Parallelized`: `attach_optimizer` once the
optimizer exists, `no_sync` + `backward` per micro-batch, `clip_and_step` per step, and
`full_state_dicts` / `load_full_state_dicts` for full checkpoints (whole state dicts, so a
checkpoint written under one engine loads under any other) and `sharded_state` /
`load_sharded` for sharded ones (torch.distributed.checkpoint; not under DeepSpeed).

The run folder the loop writes is served here too: checkpoints (parallel/checkpoint.py,
sharded_checkpoint.py), its lock, resume checks and stop signals (run_folder.py), and what it
logs (run_log.py: metrics.jsonl, the W&B sink, summary.json, profiles).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from parallel.context import CPSettings, apply_context_parallel
from parallel.dist import DistInfo, init_distributed
from parallel.mesh import Mesh, build_mesh
from parallel.sharding import shard_batch
from parallel.wrappers import BlockWrapping, apply_block_wrappers


@dataclass
class Parallelized:
    module: nn.Module          # what the train loop calls (the model, DDP wrapper or DeepSpeed engine)
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

    # ------------------------------------------------------------------ the train loop's seam
    # Defaults: plain autograd and the torch optimizer (single, DDP, FSDP2). DeepSpeed
    # overrides them (parallel/deepspeed_engine.py).
    def attach_optimizer(self, optimizer: torch.optim.Optimizer, *, max_norm: float,
                         grad_accum: int, micro_batch: int) -> None:
        """Called once, after the optimizer is built and before any step or checkpoint load:
        engines that wrap the optimizer build themselves here. `max_norm` is the clipping
        norm (inf: none), `grad_accum` the micro-batches per step, `micro_batch` rows each."""

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradient of `loss` (already scaled by the loop; never rescaled here)."""
        loss.backward()

    def clip_and_step(self, optimizer: torch.optim.Optimizer, max_norm: float) -> float:
        """Clip the accumulated gradients to `max_norm` (inf: no clipping), update, clear the
        gradients; return the global gradient norm before clipping. A non-finite norm leaves
        the parameters and optimizer state untouched (the loop then stops)."""
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()  # FSDP2: DTensor
        if math.isfinite(norm):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def full_state_dicts(self, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
        """Collective: (model, optimizer) full state dicts keyed by parameter name, on CPU;
        complete on rank 0 at least."""
        from parallel.checkpoint import full_state_dicts
        return full_state_dicts(self.model, optimizer)

    def load_full_state_dicts(self, optimizer: torch.optim.Optimizer, model_sd: dict,
                              optim_sd: dict, from_rank0: bool) -> None:
        """Collective: restore what `full_state_dicts` returned (under any engine); with
        `from_rank0` only rank 0 passes the dicts (others pass empty ones)."""
        from parallel.checkpoint import load_full_state_dicts
        load_full_state_dicts(self.model, optimizer, model_sd, optim_sd, from_rank0)

    # sharded checkpoints (trainer.ckpt_format=sharded): each rank's own part, nothing gathered
    sharded_checkpoints = True

    @property
    def shards_parameters(self) -> bool:
        """True when ranks hold different parts of the parameters (FSDP2's DTensors)."""
        return any(hasattr(p, "to_local") for p in self.model.parameters())

    def sharded_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """This rank's part of the model and optimizer state (parallel/sharded_checkpoint.py)."""
        from parallel.sharded_checkpoint import state_of
        return state_of(self.model, optimizer)

    def load_sharded(self, optimizer: torch.optim.Optimizer, folder) -> None:
        """Collective: load a sharded checkpoint folder as this run is sharded now."""
        from parallel.sharded_checkpoint import read
        read(folder, self.model, optimizer)


# engine(model, info) -> the module the train loop calls, or a Parallelized of its own
Engine = Callable[[nn.Module, DistInfo], "nn.Module | Parallelized"]


def parallelize(model: nn.Module, info: DistInfo, engine: Engine, mesh: Mesh,
                cp: CPSettings = CPSettings(), blocks: BlockWrapping = BlockWrapping()
                ) -> Parallelized:
    """Apply context parallelism, the block wrappers and `engine` (see the module docstring)
    to `model` in place; `cp` as validated by CPSettings.from_config for this launch."""
    chosen = apply_context_parallel(model, mesh, cp) if mesh.cp > 1 else {}
    apply_block_wrappers(model, blocks)
    built = engine(model, info)
    if isinstance(built, Parallelized):  # an engine with its own step and state (DeepSpeed)
        built.mesh, built.layout, built.cp_strategies = mesh, cp.layout, chosen
        return built
    return Parallelized(built, model, mesh, cp.layout, chosen)


__all__ = ["BlockWrapping", "CPSettings", "DistInfo", "Engine", "Mesh", "Parallelized",
           "build_mesh", "init_distributed", "parallelize"]
