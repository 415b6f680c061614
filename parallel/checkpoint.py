"""Atomic, verified, resumable checkpoints.

Layout: <ckpt_dir>/step_00000100/ holding the model and optimizer state in one of two formats
(`trainer.ckpt_format`):
- full: model.pt, optim.pt (whole state dicts written by rank 0, whatever the engine: plain,
  DDP, FSDP2 or DeepSpeed ZeRO, gathered and scattered by the engine's
  `Parallelized.full_state_dicts` / `load_full_state_dicts`);
- sharded: state/ (torch.distributed.checkpoint: each rank writes what it holds, nothing is
  gathered; parallel/sharded_checkpoint.py) and scheduler.pt; optionally written in the
  background (`trainer.ckpt_async`), completed by `complete_pending`.
Both load under any world size (sharded: not under DeepSpeed) and in one process. Beside them:
rank_<r>.pt (each rank's data-iterator state and RNG states) and meta.json (written last, with
every file's size and sha256; each rank hashes the shard files it wrote).
Every rank writes into a hidden temporary folder; once all are done, rank 0 renames it into
place. A crash at any point leaves either the old set of complete checkpoints or the new one;
leftover temporaries are removed by `clean_temporaries` at the next start.
A checkpoint is usable only if meta.json parses and every file it lists has the recorded size
and digest (rank 0 checks, every rank gets the verdict); `resolve_resume('auto')` skips a
corrupt newest one with a warning and takes the one before. A full disk fails the save with
one message naming the folder, and leaves the previous checkpoints as they were.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from parallel import sharded_checkpoint as sharded
from parallel.dist import DistInfo, barrier, broadcast_object

_STEP_DIR = re.compile(r"^step_(\d{8})$")
_TMP_PREFIX = ".tmp-step_"
_CHUNK = 8 << 20   # bytes read per hash update: streams files of any size in bounded memory
_SLACK = 1 << 20   # per-file allowance for pickle/zip framing in the free-space estimate


FORMATS = ("full", "sharded")


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or used. A ValueError so train.py's CLI reports it
    as one line, like the other errors a user fixes (config, input, folder)."""


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


def _step_of(p: Path) -> int:
    return int(_STEP_DIR.match(p.name).group(1))


def step_folders(ckpt_dir: Path) -> list[Path]:
    """Every step_<8 digits> folder, complete or not, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted((p for p in ckpt_dir.iterdir() if _STEP_DIR.match(p.name) and p.is_dir()),
                  key=_step_of)


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Checkpoints with a meta.json, oldest first (their files are not verified here: see
    `checkpoint_problem`)."""
    return [p for p in step_folders(ckpt_dir) if (p / "meta.json").is_file()]


def clean_temporaries(ckpt_dir: Path, info: DistInfo) -> list[Path]:
    """Collective: rank 0 removes the temporary folders of saves that crashed before their
    rename. Safe at start only: the run folder's lock keeps any other writer out, so nothing
    in them is still being written. Returns the removed folders (rank 0)."""
    removed = []
    if info.is_main and ckpt_dir.is_dir():
        for p in sorted(ckpt_dir.glob(_TMP_PREFIX + "*")):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
        if removed:
            print(f"removed {len(removed)} temporary checkpoint folder(s) left by an interrupted "
                  f"save in {ckpt_dir}: {', '.join(p.name for p in removed)}", flush=True)
    barrier()
    return removed


# ----------------------------------------------------------------------------- verification
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _signature(path: Path) -> tuple | None:
    """Stat of every file in the folder; ctime changes on any write, so an unchanged signature
    means unchanged contents."""
    try:
        return tuple(sorted((str(f.relative_to(path)), s.st_size, s.st_mtime_ns, s.st_ctime_ns,
                             s.st_ino) for f in path.rglob("*") if f.is_file() for s in [f.stat()]))
    except OSError:
        return None


# folders verified by this process, with their signature: resume verifies the chosen folder,
# then loads it, and the divergence message names it again; each would otherwise re-hash
# every byte (minutes for a large model)
_VERIFIED: dict[str, tuple] = {}


def _problem(path: Path) -> str | None:
    try:
        meta = json.loads((path / "meta.json").read_text())
    except FileNotFoundError:
        return "meta.json: missing"
    except (OSError, ValueError):
        return "unreadable meta.json"
    if not (isinstance(meta, dict) and isinstance(meta.get("step"), int)
            and isinstance(meta.get("world"), int)):
        return "unreadable meta.json (no step/world)"
    files = meta.get("files")
    if files is None:  # written before sizes and digests were recorded: what can be checked
        for name in ["model.pt", "optim.pt", *(f"rank_{r}.pt" for r in range(meta["world"]))]:
            f = path / name
            if not f.is_file():
                return f"{name}: missing"
            if f.stat().st_size == 0:
                return f"{name}: empty"
        return None
    if not (isinstance(files, dict) and files and all(
            isinstance(r, dict) and {"size", "sha256"} <= r.keys() for r in files.values())):
        return "unreadable meta.json (bad files table)"
    # sizes of all files first: a missing or truncated file is found without hashing anything
    for name, rec in files.items():
        f = path / name
        if not f.is_file():
            return f"{name}: missing"
        size = f.stat().st_size
        if size != rec["size"]:
            return f"{name}: size mismatch, {size} bytes, expected {rec['size']}"
    for name, rec in files.items():
        if _sha256(path / name) != rec["sha256"]:
            return f"{name}: checksum mismatch"
    return None


def checkpoint_problem(path: Path) -> str | None:
    """None if the folder is a usable checkpoint, else why not ('<file>: <what>'). Local: call
    it on rank 0 and broadcast the verdict."""
    sig = _signature(path)
    if sig is not None and _VERIFIED.get(str(path)) == sig:
        return None
    why = _problem(path)
    if why is None and sig is not None:
        _VERIFIED[str(path)] = sig
    return why


def _newest_usable(ckpt_dir: Path) -> tuple[str | None, list[str], str | None]:
    """(newest usable folder, one warning per newer unusable one, error if none is usable)."""
    bad = []
    for p in reversed(step_folders(ckpt_dir)):
        why = checkpoint_problem(p)
        if why is None:
            return str(p), [f"checkpoint {b} is corrupt ({w}); using {p}" for b, w in bad], None
        bad.append((p, why))
    if not bad:
        return None, [], None
    # a fresh start here would overwrite the earlier run's steps one by one
    return None, [], (f"no usable checkpoint in {ckpt_dir} (trainer.resume=auto): "
                      + "; ".join(f"{b.name} ({w})" for b, w in bad)
                      + "; not starting fresh over an earlier run: repair or move them away")


def last_good_checkpoint(ckpt_dir: Path, info: DistInfo) -> Path | None:
    """Collective: the newest usable checkpoint or None; no warnings, never raises (for
    messages, e.g. on divergence)."""
    path = broadcast_object(_newest_usable(ckpt_dir)[0] if info.is_main else None)
    return Path(path) if path else None


def resolve_resume(resume: str | None, ckpt_dir: Path, info: DistInfo) -> Path | None:
    """`auto`: newest usable checkpoint, skipping corrupt newer ones with a warning; None only
    if there is no step folder at all. `none`/null: None. Else a path that must be usable."""
    if resume in (None, "none", "null", False):
        return None
    if resume == "auto":
        path, warnings, error = broadcast_object(_newest_usable(ckpt_dir) if info.is_main else None)
        if info.is_main:
            for line in warnings:
                print(f"warning: {line}", file=sys.stderr, flush=True)
        if error:
            raise CheckpointError(error)
        return Path(path) if path else None
    path = Path(resume)
    if not (path / "meta.json").is_file():
        raise ValueError(f"trainer.resume={resume!r} is not a complete checkpoint folder "
                         "(expected meta.json inside); use auto, none or a step_<8 digits> folder")
    why = broadcast_object(checkpoint_problem(path) if info.is_main else None)
    if why:
        raise CheckpointError(f"trainer.resume={resume!r} is corrupt ({why}); name another "
                              "checkpoint, or use auto (the newest usable one)")
    return path


# ----------------------------------------------------------------------------- saving
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


def _gather_objects(obj) -> list:
    # parallel/dist.py has no all-gather of objects; every rank must learn every rank's outcome
    # (a rank that raised alone would leave the others waiting in the next collective)
    if dist.is_initialized() and dist.get_world_size() > 1:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def _out_of_space(err: BaseException, path: Path, need: int) -> bool:
    e = err
    while e is not None:
        if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left" in str(e):
            return True
        e = e.__cause__ or e.__context__
    if isinstance(err, RuntimeError):
        # torch's C++ writer drops the errno ("unexpected pos ...", "file write failed"): a
        # disk that cannot hold the rest of the file now is the cause
        try:
            written = path.stat().st_size if path.is_file() else 0
            return shutil.disk_usage(path.parent).free < max(need - written, _SLACK)
        except OSError:
            return False
    return False


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


# an async sharded save still writing: completed by complete_pending (one at a time)
_PENDING: dict | None = None


def save_checkpoint(ckpt_dir: Path, step: int, info: DistInfo, par, optimizer, scheduler,
                    data_state: dict, config: dict, keep: int = 2, fmt: str = "full",
                    async_save: bool = False) -> Path:
    """Collective: every rank calls it. `par` is the `parallel.Parallelized` of the run (its
    engine gathers the full state, or gives each rank's shards for fmt="sharded"). Returns the
    final folder (with `async_save`, where it will be once `complete_pending` ran); raises
    CheckpointError on every rank if any rank fails to write (the temporary folder is removed,
    older checkpoints stay)."""
    global _PENDING
    if fmt not in FORMATS or (async_save and fmt != "sharded"):
        raise ValueError(f"checkpoint format {fmt!r} (async {async_save}): full or sharded; "
                         "async needs sharded")
    complete_pending(info)
    final = ckpt_dir / f"step_{step:08d}"
    tmp = ckpt_dir / f"{_TMP_PREFIX}{step:08d}"
    prev = None
    if info.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftover of an earlier crash
        tmp.mkdir()
        earlier = [p for p in complete_checkpoints(ckpt_dir) if _step_of(p) < step]
        prev = str(earlier[-1]) if earlier else None
    own = {"data": data_state, "rng": rng_state()}
    if fmt == "full":
        model_sd, optim_sd = par.full_state_dicts(optimizer)  # collective; full tensors on rank 0
        optim = {"optimizer": optim_sd, "scheduler": scheduler.state_dict()}
        need = {"model.pt": sharded.local_bytes(model_sd) + _SLACK,
                "optim.pt": sharded.local_bytes(optim) + _SLACK}
        total = sum(need.values())
    else:
        state = par.sharded_state(optimizer)  # this rank's part, nothing gathered
        need = {}
        total = sum(_gather_objects(sharded.local_bytes(state))) + _SLACK * (info.world + 1)
    failure = None
    if info.is_main:
        # refuse before writing anything when the tensors alone cannot fit
        total, free = total + _SLACK * info.world, shutil.disk_usage(ckpt_dir).free
        if free < total:
            failure = f"it needs about {_mib(total)}, {_mib(free)} free"
    # every rank names rank 0's view; also keeps the other ranks from writing before rank 0
    # made the temporary folder
    failure, prev = broadcast_object((failure, prev))
    kept = (f"the previous checkpoint {prev} is intact" if prev
            else "there is no previous checkpoint")
    no_space = f"no space left on {ckpt_dir} while writing checkpoint step {step} ({kept})"
    if failure is not None:
        failure = f"{no_space}: {failure}"
    local_err = None

    def attempt(writes) -> str | None:
        nonlocal local_err
        for name, write in writes:
            try:
                write()
            except Exception as err:  # shared with every rank, so all raise together
                local_err = err
                if _out_of_space(err, tmp / name, need.get(name, _SLACK)):
                    return no_space
                return (f"could not write checkpoint step {step} in {ckpt_dir} ({name} on rank "
                        f"{info.rank}: {type(err).__name__}: {err}); {kept}")
        return None

    writes = [(f"rank_{info.rank}.pt", lambda: torch.save(own, tmp / f"rank_{info.rank}.pt"))]
    if info.is_main and fmt == "full":
        writes += [("model.pt", lambda: torch.save(model_sd, tmp / "model.pt")),
                   ("optim.pt", lambda: torch.save(optim, tmp / "optim.pt"))]
    elif info.is_main:
        writes += [("scheduler.pt", lambda: torch.save(scheduler.state_dict(), tmp / "scheduler.pt"))]
    if failure is None:
        failure = next((f for f in _gather_objects(attempt(writes)) if f), None)
    job = {"ckpt_dir": ckpt_dir, "step": step, "tmp": tmp, "final": final, "world": info.world,
           "config": config, "keep": keep, "fmt": fmt, "kept": kept, "no_space": no_space}
    if failure is None and fmt == "sharded":
        # collective inside DCP, which shares any rank's exception with every rank
        write = sharded.write_async if async_save else sharded.write
        failure = attempt([(sharded.STATE_DIR, lambda: job.update(future=write(state, tmp)))])
    if failure is None and async_save:
        _PENDING = job
        return final
    _finish(job, info, failure, local_err)
    return final


def complete_pending(info: DistInfo) -> Path | None:
    """Collective: wait for the async save in flight (if any) and complete its folder (digests,
    meta.json, rename, pruning); returns it. Raises CheckpointError on every rank if any rank's
    writer failed."""
    global _PENDING
    job, _PENDING = _PENDING, None
    if job is None:
        return None
    failure = err = None
    try:
        job["future"].result()
    except Exception as e:  # noqa: BLE001  (shared with every rank below)
        err = e
        failure = (job["no_space"] if _out_of_space(e, job["tmp"] / sharded.STATE_DIR, _SLACK)
                   else f"could not write checkpoint step {job['step']} in {job['ckpt_dir']} "
                        f"(background writer on rank {info.rank}: {type(e).__name__}: {e}); "
                        f"{job['kept']}")
    failure = next((f for f in _gather_objects(failure) if f), None)
    _finish(job, info, failure, err)
    return job["final"]


def _finish(job: dict, info: DistInfo, failure: str | None, local_err) -> None:
    """Collective: digests, meta.json, rename into place and pruning, or (on `failure`, known
    to every rank) the temporary folder removed and CheckpointError raised everywhere."""
    tmp, final, ckpt_dir = job["tmp"], job["final"], job["ckpt_dir"]
    if failure is None:
        # each rank hashes the shard files it wrote (no rank reads every byte); rank 0 the rest
        own = {str(f.relative_to(tmp)): {"size": f.stat().st_size, "sha256": _sha256(f)}
               for f in (sharded.own_files(tmp, info.rank) if job["fmt"] == "sharded" else [])}
        hashed = {}
        for part in _gather_objects(own):
            hashed.update(part)

        def finish():
            files = {name: hashed.get(name) or {"size": f.stat().st_size, "sha256": _sha256(f)}
                     for f in sorted(tmp.rglob("*")) if f.is_file()
                     for name in [str(f.relative_to(tmp))]}
            meta = {"step": job["step"], "world": job["world"], "format": job["fmt"],
                    "config": job["config"], "files": files}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
            for f in tmp.iterdir():  # data on disk before the rename makes it visible
                if f.is_file():  # (DCP syncs its own files)
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())  # may be where a full disk shows (delayed allocation)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _VERIFIED[str(final)] = _signature(final)  # just hashed
            # the folder just written is never pruned, even if newer steps are on disk (a
            # resume that fell back past a corrupt newest checkpoint)
            others = [p for p in complete_checkpoints(ckpt_dir) if p != final]
            keep = job["keep"]
            for old in others[:max(len(others) - (keep - 1), 0)] if keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)

        def attempt_finish() -> str | None:
            nonlocal local_err
            try:
                finish()
            except Exception as err:
                local_err = err
                if _out_of_space(err, tmp / "meta.json", _SLACK):
                    return job["no_space"]
                return (f"could not write checkpoint step {job['step']} in {ckpt_dir} (meta.json "
                        f"on rank 0: {type(err).__name__}: {err}); {job['kept']}")
            return None

        failure = broadcast_object(attempt_finish() if info.is_main else None)
    if failure is not None:
        if info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(failure) from local_err


def load_checkpoint(path: Path, info: DistInfo, par, optimizer, scheduler) -> tuple[int, dict]:
    """Restore model, optimizer (through `par`, the run's `parallel.Parallelized`), scheduler and
    this rank's RNG; return (step, data_state). Refuses a folder that fails verification."""
    why = broadcast_object(checkpoint_problem(path) if info.is_main else None)
    if why:
        raise CheckpointError(f"checkpoint {path} is corrupt ({why}); not loading it "
                              "(trainer.resume=auto skips corrupt checkpoints)")
    meta = json.loads((path / "meta.json").read_text())
    multi = info.world > 1
    if meta.get("format", "full") == "sharded":
        par.load_sharded(optimizer, path)  # collective; every rank reads its part
        sched = torch.load(path / "scheduler.pt", map_location="cpu", weights_only=False)
    else:
        # rank 0 reads the files and broadcasts (FSDP2 and ZeRO then keep each rank's shard)
        read = info.is_main or not multi
        model_sd = torch.load(path / "model.pt", map_location="cpu", weights_only=True) if read else {}
        opt = torch.load(path / "optim.pt", map_location="cpu", weights_only=False) if read else None
        par.load_full_state_dicts(optimizer, model_sd, opt["optimizer"] if read else {}, multi)
        sched = broadcast_object(opt["scheduler"] if read else None) if multi else opt["scheduler"]
    scheduler.load_state_dict(sched)
    rank_file = path / f"rank_{info.rank}.pt"
    same_layout = meta["world"] == info.world and rank_file.is_file()
    # a different world size keeps the global data position (identical on every rank) and
    # reseeds RNG; with the same layout each rank continues bit-exactly
    state = torch.load(rank_file if same_layout else path / "rank_0.pt", map_location="cpu",
                       weights_only=False)
    if same_layout:
        set_rng_state(state["rng"])
    return int(meta["step"]), state["data"]
