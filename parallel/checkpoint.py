"""Atomic, resumable checkpoints.

Layout: <ckpt_dir>/step_00000100/ holding model.pt, optim.pt (full, unsharded state dicts
written by rank 0, whatever the engine: plain, DDP, FSDP2 or DeepSpeed ZeRO, gathered and
scattered by the engine's `Parallelized.full_state_dicts` / `load_full_state_dicts`, so a
checkpoint loads under any engine and world size), rank_<r>.pt (each rank's data-iterator state
and RNG states) and meta.json (written last).
Every rank writes into a hidden temporary folder; once all are done, rank 0 renames it into
place. A crash at any point leaves either the old set of complete checkpoints or the new one:
a folder without meta.json, or a leftover temporary, is never picked up by resume.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from parallel.dist import DistInfo, barrier, broadcast_object

_STEP_DIR = re.compile(r"^step_(\d{8})$")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if _STEP_DIR.match(p.name) and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def full_state_dicts(model, optimizer) -> tuple[dict, dict]:
    """Collective under FSDP2 (gathers shards): full model and optimizer state dicts keyed by
    parameter name, on CPU (rank 0 receives the full tensors)."""
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=full), get_optimizer_state_dict(model, optimizer, options=full)


def load_full_state_dicts(model, optimizer, model_sd: dict, optim_sd: dict, from_rank0: bool) -> None:
    """Inverse of `full_state_dicts`; with `from_rank0` rank 0 broadcasts (FSDP2 then keeps
    each rank's shard)."""
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=from_rank0)
    set_model_state_dict(model, model_sd, options=opts)
    set_optimizer_state_dict(model, optimizer, optim_sd, options=opts)


def save_checkpoint(ckpt_dir: Path, step: int, info: DistInfo, par, optimizer, scheduler,
                    data_state: dict, config: dict, keep: int = 2) -> Path:
    """Collective: every rank calls it. `par` is the `parallel.Parallelized` of the run (its
    engine gathers the full state). Returns the final folder."""
    final = ckpt_dir / f"step_{step:08d}"
    tmp = ckpt_dir / f".tmp-step_{step:08d}"
    if info.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftover of an earlier crash
        tmp.mkdir()
    barrier()
    torch.save({"data": data_state, "rng": rng_state()}, tmp / f"rank_{info.rank}.pt")
    model_sd, optim_sd = par.full_state_dicts(optimizer)  # collective; full tensors on rank 0
    if info.is_main:
        torch.save(model_sd, tmp / "model.pt")
        torch.save({"optimizer": optim_sd, "scheduler": scheduler.state_dict()}, tmp / "optim.pt")
    barrier()
    if info.is_main:
        meta = {"step": step, "world": info.world, "config": config}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
        for f in tmp.iterdir():  # data on disk before the rename makes it visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in complete_checkpoints(ckpt_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def resolve_resume(resume: str | None, ckpt_dir: Path, info: DistInfo) -> Path | None:
    """`auto`: newest complete checkpoint (or None); `none`/null: None; else a path that must exist."""
    if resume in (None, "none", "null", False):
        return None
    if resume == "auto":
        found = complete_checkpoints(ckpt_dir) if info.is_main else None
        path = broadcast_object(str(found[-1]) if found else None)
        return Path(path) if path else None
    path = Path(resume)
    if not (path / "meta.json").is_file():
        raise ValueError(f"trainer.resume={resume!r} is not a complete checkpoint folder "
                         "(expected meta.json inside); use auto, none or a step_<8 digits> folder")
    return path


def load_checkpoint(path: Path, info: DistInfo, par, optimizer, scheduler) -> tuple[int, dict]:
    """Restore model, optimizer (through `par`, the run's `parallel.Parallelized`), scheduler and
    this rank's RNG; return (step, data_state)."""
    meta = json.loads((path / "meta.json").read_text())
    multi = info.world > 1
    # rank 0 reads the files and broadcasts (FSDP2 and ZeRO then keep each rank's shard)
    read = info.is_main or not multi
    model_sd = torch.load(path / "model.pt", map_location="cpu", weights_only=True) if read else {}
    opt = torch.load(path / "optim.pt", map_location="cpu", weights_only=False) if read else None
    par.load_full_state_dicts(optimizer, model_sd, opt["optimizer"] if read else {}, multi)
    sched = opt["scheduler"] if read else None
    scheduler.load_state_dict(broadcast_object(sched) if multi else sched)
    rank_file = path / f"rank_{info.rank}.pt"
    same_layout = meta["world"] == info.world and rank_file.is_file()
    # a different world size keeps the global data position (identical on every rank) and
    # reseeds RNG; with the same layout each rank continues bit-exactly
    state = torch.load(rank_file if same_layout else path / "rank_0.pt", map_location="cpu",
                       weights_only=False)
    if same_layout:
        set_rng_state(state["rng"])
    return int(meta["step"]), state["data"]
