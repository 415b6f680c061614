"""A run folder belongs to one run, and a run stops cleanly when asked to.

- `RunLock`: <run folder>/run.lock (host, pid, start time) taken by rank 0 with O_EXCL; a second
  live writer is refused naming the holder. A lock whose process is gone (same host, pid not
  alive) or that has not been refreshed for STALE_S (another host: its heartbeat stopped) is
  stale and taken over, with a note. Every rank learns the verdict, so all fail together.
- `check_resume`: the config saved with the checkpoint against this run's: keys that change the
  model, the attention, the data or the schedule are refused, each named with both values
  (trainer.allow_config_change=true continues anyway); `trainer.resume=none` in a folder that
  holds checkpoints is refused (a fresh run would prune them and a later resume would mix runs).
- `StopRequests`: SIGTERM and SIGUSR1 (trainer.stop_signals) and the first SIGINT ask the loop to
  stop after the current step; the loop checkpoints and raises `Preempted` (exit code
  EXIT_PREEMPTED, which scripts/launch/slurm/train.sbatch requeues). A second SIGINT interrupts
  at once. Ranks agree on the stop through the step's existing loss all-reduce.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

from parallel.dist import DistInfo, broadcast_object

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on request after a checkpoint; run again to continue
STALE_S = 900        # a lock not refreshed for 15 min (log steps refresh it) is a dead run's

# what a resumed run may not change (prefixes of dotted config keys), and the exceptions
GUARDED = ("model.", "attn.", "data.", "optim.", "trainer.seq_len", "trainer.global_batch",
           "trainer.steps", "trainer.seed")
UNGUARDED = ("data.cache_dir", "data.val_batches")


class RunFolderInUse(RuntimeError):
    """Another live run holds the folder's lock."""


class Preempted(Exception):
    """The run stopped on a signal after writing the checkpoint of `step`."""

    def __init__(self, step: int, signame: str):
        super().__init__(f"stopped on {signame} after step {step}; the checkpoint of step "
                         f"{step} is written: run the same command to continue")
        self.step, self.signame = step, signame


# ----------------------------------------------------------------------------- the lock
class RunLock:
    def __init__(self, out_dir: Path, info: DistInfo):
        self.path, self.info, self.held = Path(out_dir) / "run.lock", info, False

    def acquire(self) -> None:
        error = self._take() if self.info.is_main else None
        error = broadcast_object(error)
        if error:
            raise RunFolderInUse(error)

    def _take(self) -> str | None:
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and not self._stale(holder):
                    return (f"run folder {self.path.parent} is in use by pid {holder['pid']} on "
                            f"{holder['host']} since {time.ctime(holder['since'])} ({self.path}); "
                            "wait for that run, or choose another run_name / hydra.run.dir")
                print(f"note: taking over the stale lock {self.path} "
                      f"({'unreadable' if holder is None else 'pid %s on %s' % (holder['pid'], holder['host'])})",
                      file=sys.stderr)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return None
        return f"run folder {self.path.parent}: could not take {self.path} (another run raced)"

    def _holder(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
            return holder if {"host", "pid", "since"} <= set(holder) else None
        except (OSError, ValueError):
            return None

    def _stale(self, holder: dict) -> bool:
        if holder["host"] == socket.gethostname():
            try:
                os.kill(int(holder["pid"]), 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                return False
            return False
        return time.time() - self.path.stat().st_mtime > STALE_S

    def refresh(self) -> None:
        """Heartbeat for readers on other hosts (called at log steps)."""
        if self.held:
            os.utime(self.path)

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


# ----------------------------------------------------------------------------- resume checks
def _flat(tree, prefix="") -> dict:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def config_changes(saved: dict, now: dict) -> list[str]:
    """'key: saved -> now' for every guarded key whose value differs (JSON-normalised)."""
    a = _flat(json.loads(json.dumps(saved, default=str)))
    b = _flat(json.loads(json.dumps(now, default=str)))
    out = []
    for key in sorted(set(a) | set(b)):
        if key.startswith(GUARDED) and not key.startswith(UNGUARDED) and a.get(key) != b.get(key):
            out.append(f"{key}: {a.get(key, '(absent)')!r} -> {b.get(key, '(absent)')!r}")
    return out


def check_resume(resume, checkpoints: list[Path], resume_from: Path | None, config: dict,
                 allow_change: bool) -> None:
    """Refuse `resume=none` over existing checkpoints, and a resume that changes guarded keys."""
    if resume_from is None and checkpoints and resume in (None, "none", "null", False):
        raise ValueError(f"trainer.resume=none but {checkpoints[-1].parent} holds checkpoints of "
                         f"an earlier run (newest: {checkpoints[-1].name}); resume it with "
                         "trainer.resume=auto, or start in a new folder (run_name=... or "
                         "hydra.run.dir=...), or move those checkpoints away")
    if resume_from is None or allow_change:
        return
    saved = json.loads((resume_from / "meta.json").read_text()).get("config")
    if saved is None:
        return
    changes = config_changes(saved, config)
    if changes:
        raise ValueError(f"trainer.resume: {resume_from} was written with a different config; "
                         "changed: " + "; ".join(changes) + ". Resume with the same settings, "
                         "start a new run (run_name=...), or set "
                         "trainer.allow_config_change=true to continue anyway")


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics.jsonl rows of steps after `step` (a crashed run's steps that the resumed
    run redoes), so every step appears once."""
    if not path.is_file():
        return
    rows = path.read_text().splitlines(keepends=True)
    kept = [r for r in rows if json.loads(r).get("step", 0) <= step] if rows else rows
    if len(kept) != len(rows):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)


# ----------------------------------------------------------------------------- signals
class StopRequests:
    """Signal handlers that request a stop after the current step (see the module docstring)."""

    def __init__(self, names=("SIGTERM", "SIGUSR1")):
        self.signame = None
        self._previous = {}
        for name in list(names) + ["SIGINT"]:
            if not hasattr(signal, str(name)):
                raise ValueError(f"trainer.stop_signals: {name!r} is not a signal name here "
                                 "(e.g. SIGTERM, SIGUSR1)")
            sig = getattr(signal, name)
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. inside some launchers): no handlers
                pass

    def _handler(self, signum, frame):
        name = signal.Signals(signum).name
        if name == "SIGINT" and self.signame == "SIGINT":
            raise KeyboardInterrupt  # the second Ctrl-C: now
        if self.signame is None:
            self.signame = name
            print(f"\n{name}: stopping after this step with a checkpoint"
                  + (" (Ctrl-C again to stop at once)" if name == "SIGINT" else ""),
                  file=sys.stderr, flush=True)

    @property
    def requested(self) -> float:
        return 0.0 if self.signame is None else 1.0

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
