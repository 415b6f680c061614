"""Process-group setup from torchrun's or SLURM's environment, and small collectives."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_layout() -> DistInfo:
    """Rank layout from torchrun (RANK/WORLD_SIZE) or, failing that, from srun's tasks."""
    if "WORLD_SIZE" in os.environ:
        return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ["WORLD_SIZE"]),
                        int(os.environ.get("LOCAL_RANK", 0)))
    if "SLURM_NTASKS" in os.environ and "SLURM_PROCID" in os.environ and int(os.environ["SLURM_NTASKS"]) > 1:
        return _slurm_layout()
    return DistInfo()


def _slurm_layout() -> DistInfo:
    """srun started one process per task (hydra/launcher=slurm, or srun directly): submitit
    reads the layout and the first node's address from SLURM's variables and exports them
    for env://, as torchrun would have set them."""
    try:
        from submitit.helpers import TorchDistributedEnvironment
    except ImportError as err:
        raise ValueError("SLURM tasks without torchrun need submitit: pip install -e '.[slurm]'") from err
    # submitit picks its SLURM reader by this variable, which only its own launches set
    os.environ.setdefault("SUBMITIT_EXECUTOR", "slurm")
    env = TorchDistributedEnvironment()
    env.master_addr = os.environ.get("MASTER_ADDR", env.master_addr)  # an explicit address wins
    # devices stay as SLURM gave them: the run picks cuda:<local rank> itself
    env.export(set_cuda_visible_devices=False, overwrite=True)
    return DistInfo(env.rank, env.world_size, env.local_rank)


def init_distributed(device_type: str, backend: str = "auto") -> DistInfo:
    """Join the process group when launched with several processes; no-op for one."""
    info = _env_layout()
    if info.world == 1 or dist.is_initialized():
        return info
    if backend == "auto":
        backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl" and device_type != "cuda":
        raise ValueError("parallel.backend=nccl needs CUDA devices; use gloo on CPU")
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world)
    return info


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def shutdown(together: bool = False) -> None:
    """Tear the process group down (no-op without one). together: every rank got here normally,
    so they meet at a barrier first; a rank that tears gloo down while a peer is still in its
    last collective can abort at exit ("terminate called without an active exception"). Error
    paths pass False: a peer that failed would never reach the barrier."""
    if dist.is_initialized():
        if together and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
