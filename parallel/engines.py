"""The data-parallel engines that wrap a plain module: `engine(model, info, **options)`, named by
the `_target_` of configs/parallel/<name>.yaml, whose other keys (but `backend`, which
init_distributed reads) are the options. Each returns the module the train loop calls; one
process gets the plain model. DeepSpeed, which also owns the step and the state, is in
parallel/deepspeed_engine.py."""
from __future__ import annotations

import torch
from torch import nn

from parallel.dist import DistInfo


def single(model: nn.Module, info: DistInfo) -> nn.Module:
    """No distribution: refuses a multi-process launch rather than train ranks apart."""
    if info.world > 1:
        raise ValueError(f"parallel=single but {info.world} processes were launched; "
                         "use parallel=ddp under torchrun")
    return model


def ddp(model: nn.Module, info: DistInfo, *, bucket_cap_mb: int = 25) -> nn.Module:
    """torch DDP; `bucket_cap_mb` is its gradient bucket size."""
    if not isinstance(bucket_cap_mb, (int, float)) or isinstance(bucket_cap_mb, bool) \
            or bucket_cap_mb <= 0:
        raise ValueError(f"parallel.bucket_cap_mb={bucket_cap_mb!r} must be a number > 0 (MB)")
    if info.world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel
    # gradients average over every rank: data-parallel peers and context-parallel peers (whose
    # parameters are replicated too); the train loop scales the loss to undo the averaging
    device_ids = [info.local_rank] if next(model.parameters()).is_cuda else None
    return DistributedDataParallel(model, device_ids=device_ids, bucket_cap_mb=bucket_cap_mb)


def fsdp(model: nn.Module, info: DistInfo, *, param_dtype: str = "auto") -> nn.Module:
    """FSDP2: parameters, gradients and optimizer state sharded over every rank, one unit per
    block plus the root (embedding, final norm, head). Gathers run in `param_dtype`
    (auto: bf16 on CUDA, fp32 on CPU); gradients reduce in fp32."""
    on_cuda = next(model.parameters()).is_cuda
    table = {"auto": torch.bfloat16 if on_cuda else torch.float32, "bf16": torch.bfloat16,
             "fp32": torch.float32}
    if param_dtype not in table:
        raise ValueError(f"parallel.param_dtype={param_dtype!r} must be auto, bf16 or fp32")
    if info.world == 1:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=table[param_dtype], reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp, reshard_after_forward=False)  # root is needed right after
    return model
