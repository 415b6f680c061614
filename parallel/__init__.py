"""Distribution applied from outside the model: process groups and data-parallel engines.

`parallel.engine` (configs/parallel/) picks an entry of ENGINES; each takes the built model
and returns the module to train plus the data-parallel layout.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from parallel.dist import DistInfo, init_distributed


@dataclass
class Parallelized:
    module: nn.Module          # what the train loop calls (possibly a DDP wrapper)
    model: nn.Module           # the bare model (state dicts, FLOPs)
    dp_rank: int
    dp_world: int

    def no_sync(self, sync: bool):
        """Context: skip the gradient all-reduce on accumulation micro-steps."""
        import contextlib
        if sync or not hasattr(self.module, "no_sync"):
            return contextlib.nullcontext()
        return self.module.no_sync()


def _single(model, info: DistInfo, cfg) -> Parallelized:
    if info.world > 1:
        raise ValueError(f"parallel=single but {info.world} processes were launched; "
                         "use parallel=ddp under torchrun")
    return Parallelized(model, model, 0, 1)


def _ddp(model, info: DistInfo, cfg) -> Parallelized:
    if info.world == 1:
        return Parallelized(model, model, 0, 1)
    from torch.nn.parallel import DistributedDataParallel
    device_ids = [info.local_rank] if next(model.parameters()).is_cuda else None
    wrapped = DistributedDataParallel(model, device_ids=device_ids,
                                      bucket_cap_mb=cfg.get("bucket_cap_mb", 25))
    return Parallelized(wrapped, model, info.rank, info.world)


ENGINES = {"single": _single, "ddp": _ddp}


def parallelize(model: nn.Module, info: DistInfo, cfg) -> Parallelized:
    engine = cfg.engine
    if engine not in ENGINES:
        raise ValueError(f"parallel.engine={engine!r} is unknown; valid: {', '.join(ENGINES)}")
    return ENGINES[engine](model, info, cfg)


__all__ = ["DistInfo", "ENGINES", "Parallelized", "init_distributed", "parallelize"]
