"""A run folder belongs to one run (lock, config compared on resume, resume=none refused over
checkpoints, metrics without duplicate steps) and a run stops cleanly on SIGTERM / SIGINT with a
checkpoint from which it continues exactly as if never stopped."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import train
from parallel.dist import DistInfo
from parallel.run_folder import (EXIT_PREEMPTED, STALE_S, RunFolderInUse, RunLock,
                                 config_changes)
from run_configs import SMALL_RUN

ROOT = Path(__file__).resolve().parents[2]


def losses(folder: Path) -> dict:
    rows = [json.loads(r) for r in (folder / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert len(steps) == len(set(steps)), f"duplicate steps in metrics.jsonl: {steps}"
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


# ----------------------------------------------------------------------------- the lock
def test_second_live_writer_is_refused_and_stale_locks_are_taken_over(tmp_path, capsys):
    first = RunLock(tmp_path, DistInfo())
    first.acquire()
    with pytest.raises(RunFolderInUse, match=rf"run folder {tmp_path} is in use by pid "
                                             rf"{os.getpid()} on {socket.gethostname()}"):
        RunLock(tmp_path, DistInfo()).acquire()
    first.release()
    assert not (tmp_path / "run.lock").exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()                                         # a pid that no longer runs
    (tmp_path / "run.lock").write_text(json.dumps(
        {"host": socket.gethostname(), "pid": dead.pid, "since": time.time()}))
    RunLock(tmp_path, DistInfo()).acquire()
    assert "taking over the stale lock" in capsys.readouterr().err
    other = {"host": "elsewhere", "pid": 1, "since": time.time()}
    (tmp_path / "run.lock").write_text(json.dumps(other))   # another host, fresh heartbeat
    with pytest.raises(RunFolderInUse, match="in use by pid 1 on elsewhere"):
        RunLock(tmp_path, DistInfo()).acquire()
    old = time.time() - STALE_S - 60                        # its heartbeat stopped
    os.utime(tmp_path / "run.lock", (old, old))
    RunLock(tmp_path, DistInfo()).acquire()


def test_two_runs_started_together_one_is_refused(tmp_path):
    """Two `python train.py` on one folder at once: one trains, the other exits at once with
    the lock's message (never a crash inside a checkpoint, never interleaved metrics)."""
    env = dict(os.environ, LONGCTX_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    args = [sys.executable, str(ROOT / "train.py"), *SMALL_RUN, "trainer.steps=30",
            "trainer.ckpt_every=10", f"hydra.run.dir={tmp_path / 'run'}"]
    procs = [subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes[0] == 0 and codes[1] != 0, results
    refused = next(err for code, err in results if code != 0)
    assert refused.strip().splitlines()[-1].startswith("error: run folder"), refused
    assert sorted(losses(tmp_path / "run")) == list(range(1, 31))


# ----------------------------------------------------------------------------- resume checks
def test_config_changes_name_the_guarded_keys():
    saved = {"model": {"dim": 32}, "optim": {"lr": 1e-3}, "trainer": {"steps": 10, "log_every": 1},
             "data": {"cache_dir": "/a"}}
    now = {"model": {"dim": 64}, "optim": {"lr": 1e-3}, "trainer": {"steps": 10, "log_every": 5},
           "data": {"cache_dir": "/b"}}
    assert config_changes(saved, now) == ["model.dim: 32 -> 64"]


@pytest.mark.parametrize("change,key", [("optim.lr=1e-2", "optim.lr"),
                                        ("model.rope_theta=500", "model.rope_theta"),
                                        ("attn=flash", "attn.name"),
                                        ("trainer.steps=12", "trainer.steps")])
def test_resume_with_a_changed_config_is_refused(compose, tmp_path, change, key):
    base = ["trainer.steps=6", "trainer.val_every=0", "trainer.ckpt_every=3"]
    train.run(compose(*base, "trainer.run_steps=3"), tmp_path / "run")
    with pytest.raises(ValueError, match=rf"trainer.resume: .*step_00000003 was written with a "
                                         rf"different config; changed: .*{key}: "):
        train.run(compose(*base, change), tmp_path / "run")
    train.run(compose(*base, change, "trainer.allow_config_change=true"), tmp_path / "run")
    assert sorted(losses(tmp_path / "run")) == list(range(1, 7)) or change.startswith("trainer")


def test_fresh_start_over_checkpoints_is_refused(compose, tmp_path):
    base = ["trainer.steps=6", "trainer.val_every=0", "trainer.ckpt_every=3"]
    train.run(compose(*base), tmp_path / "run")
    with pytest.raises(ValueError, match=r"trainer.resume=none but .*checkpoints holds "
                                         r"checkpoints of an earlier run \(newest: step_00000006\)"):
        train.run(compose(*base, "trainer.resume=none"), tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir()) == \
        ["step_00000003", "step_00000006"]                  # untouched


def test_steps_redone_after_a_crash_are_logged_once(compose, tmp_path):
    base = ["trainer.steps=6", "trainer.val_every=0", "trainer.ckpt_every=3"]
    train.run(compose(*base), tmp_path / "run")
    import shutil
    shutil.rmtree(tmp_path / "run/checkpoints/step_00000006")   # as if killed before saving 6
    train.run(compose(*base), tmp_path / "run")                 # resumes at 3, redoes 4..6
    assert sorted(losses(tmp_path / "run")) == list(range(1, 7))


# ----------------------------------------------------------------------------- signals
def _start(tmp_path, name, extra=()):
    env = dict(os.environ, LONGCTX_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    args = [sys.executable, str(ROOT / "train.py"), *SMALL_RUN, "trainer.steps=400",
            "trainer.ckpt_every=100", "trainer.val_every=0", f"hydra.run.dir={tmp_path / name}",
            *extra]
    return subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_step(folder: Path, step: int, proc, timeout=300):
    end = time.time() + timeout
    while time.time() < end:
        f = folder / "metrics.jsonl"
        if f.is_file() and any(json.loads(r).get("step", 0) >= step
                               for r in f.read_text().splitlines() if r.strip()):
            return
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    raise AssertionError("the run did not reach its step")


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1", "SIGINT"])
def test_signal_checkpoints_and_the_run_continues_exactly(tmp_path, sig):
    """The signal at a mid-run step: exit 75 after a checkpoint of the step it stopped at (not a
    multiple of ckpt_every); the same command continues, and the losses equal an uninterrupted
    run's, step for step."""
    proc = _start(tmp_path, "stopped")
    _wait_for_step(tmp_path / "stopped", 5, proc)
    proc.send_signal(getattr(signal, sig))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, err
    stopped_at = max(losses(tmp_path / "stopped"))
    assert f"stopped on {sig} after step {stopped_at}" in err
    assert (tmp_path / "stopped/checkpoints" / f"step_{stopped_at:08d}" / "meta.json").is_file()
    resumed = _start(tmp_path, "stopped", ["trainer.run_steps=3"])
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    full = _start(tmp_path, "full", [f"trainer.run_steps={stopped_at + 3}"])
    assert full.wait(timeout=300) == 0, full.stderr.read()
    a, b = losses(tmp_path / "stopped"), losses(tmp_path / "full")
    assert sorted(a) == sorted(b) == list(range(1, stopped_at + 4))
    assert [a[s] for s in sorted(a)] == [b[s] for s in sorted(b)]


def test_stop_requests_second_ctrl_c_raises_at_once():
    """In process: the first SIGINT (or a SIGTERM) only requests a stop; a SIGINT after a first
    SIGINT raises KeyboardInterrupt; restore() puts the previous handlers back."""
    from parallel.run_folder import StopRequests
    before = signal.getsignal(signal.SIGINT)
    stops = StopRequests(("SIGTERM",))
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)      # after a SIGTERM: not a second Ctrl-C
        assert stops.signame == "SIGTERM" and stops.requested == 1.0
        stops.signame = None
        os.kill(os.getpid(), signal.SIGINT)
        assert stops.signame == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stops.restore()
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.slow
def test_second_ctrl_c_stops_at_once(tmp_path):
    # steps of ~0.3 s (the small run's take ~15 ms: its whole stop, step end, checkpoint and
    # exit, fits between two presses, and CI saw exit 75): the press after the first then lands
    # inside the step being finished
    slow = ["trainer.ckpt_every=0", "model.dim=256", "model.n_layers=4", "trainer.seq_len=512"]
    proc = _start(tmp_path, "run", slow)
    _wait_for_step(tmp_path / "run", 3, proc)
    proc.send_signal(signal.SIGINT)
    # Ctrl-C again and again until the run ends: every one after the first is handled must stop
    # it at once
    while proc.poll() is None:
        time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=300)
    assert proc.returncode not in (0, EXIT_PREEMPTED)
