"""Sharded checkpoint state through torch.distributed.checkpoint (DCP).

`trainer.ckpt_format=sharded` (the default under FSDP2): every rank writes only what it holds
into <step folder>/state/ (one `__<rank>_0.distcp` file per rank plus DCP's `.metadata`), so no
rank gathers the full model and optimizer state (under FSDP2 each rank writes its shards; under
DDP, DCP spreads the replicated tensors' writes over the ranks). DCP's metadata records every
tensor's global shape and each shard's place in it, so the state loads under another world
size, another sharding, or in one process without a process group (`read_model`). The step
folder's other files (rank files, scheduler, meta.json with sizes and digests) are written by
parallel/checkpoint.py as for full checkpoints; each rank hashes the shard files it wrote.

Async (`trainer.ckpt_async=true`): `dcp.async_save` copies the state to host memory, returns,
and writes in a background thread over a gloo process group of its own (collectives of the
writer thread and of the training loop must not share a group); the step folder is completed
(hashed, renamed into place) by `checkpoint.complete_pending` at the next save, at the end of
the run, or before a stop.
"""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

STATE_DIR = "state"  # DCP's folder inside a step folder
_ASYNC_GROUP = None   # the writer thread's gloo group, created once (collectively) on first use


def state_of(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """{"model": ..., "optim": ...} as this rank holds them (FSDP2: DTensor shards; DDP and one
    process: whole tensors), keyed by parameter name."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def local_bytes(state: dict) -> int:
    """Bytes this rank's part of `state` takes (a DTensor counts its local shard)."""
    total = 0
    stack = [state]
    while stack:
        obj = stack.pop()
        if isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
        elif isinstance(obj, torch.Tensor):
            t = obj.to_local() if hasattr(obj, "to_local") else obj
            total += t.numel() * t.element_size()
    return total


def _single() -> bool:
    """No process group: DCP runs in this process alone."""
    return not (dist.is_available() and dist.is_initialized())


@contextlib.contextmanager
def _quiet():
    """DCP warns on every single-process call that it assumes a single process: that is the
    intent here (no_dist is passed explicitly)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _writer(folder: Path) -> dcp.FileSystemWriter:
    return dcp.FileSystemWriter(folder / STATE_DIR, single_file_per_rank=True, sync_files=True)


def write(state: dict, folder: Path):
    """Collective: write `state` into folder/state. A failure on any rank raises on every rank
    (DCP gathers the outcome)."""
    with _quiet():
        dcp.save(state, storage_writer=_writer(folder), no_dist=_single())


def write_async(state: dict, folder: Path):
    """Collective: stage `state` in host memory and start writing it in the background; returns
    the future (its result() raises what the writer raised)."""
    global _ASYNC_GROUP
    if dist.is_initialized() and dist.get_world_size() > 1 and _ASYNC_GROUP is None:
        _ASYNC_GROUP = dist.new_group(backend="gloo")
    if _single():  # DCP warns from its writer thread too, outside any catch_warnings here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    with _quiet():
        result = dcp.async_save(state, storage_writer=_writer(folder),
                                process_group=_ASYNC_GROUP, no_dist=_single())
    return getattr(result, "upload_completion", result)  # torch >= 2.9 may wrap the future


def own_files(folder: Path, rank: int) -> list[Path]:
    """The shard files this rank wrote (DCP names them __<rank>_<n>.distcp)."""
    return sorted((folder / STATE_DIR).glob(f"__{rank}_*.distcp"))


def read(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Collective: load folder/state into `model` and `optimizer` as they are sharded now (any
    world size; DCP reads each rank's part from whichever files hold it)."""
    state = state_of(model, optimizer)
    with _quiet():
        dcp.load(state, checkpoint_id=folder / STATE_DIR, no_dist=_single())
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])


def read_model(folder: Path) -> dict[str, torch.Tensor]:
    """The whole model state, in this process alone (no process group): for export and
    inspection. Memory: the model's parameters once."""
    reader = dcp.FileSystemReader(folder / STATE_DIR)
    prefix = "model."
    model = {key[len(prefix):]: torch.empty(meta.size, dtype=meta.properties.dtype)
             for key, meta in reader.read_metadata().state_dict_metadata.items()
             if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)}
    state = {"model": model}
    with _quiet():
        dcp.load(state, storage_reader=reader, no_dist=True)
    return state["model"]
