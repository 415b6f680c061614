"""Checkpoints: only complete, verified folders are resumed from (a corrupt newest one falls back
to the one before, exactly), crashed saves leave nothing behind, a full disk fails clearly."""
import errno
import json
import os
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch

import parallel.checkpoint as ckpt
from parallel.checkpoint import (CheckpointError, checkpoint_problem, clean_temporaries,
                                 complete_checkpoints, load_checkpoint, resolve_resume,
                                 save_checkpoint)
from parallel.dist import DistInfo
from run_configs import CONFIG_DIR, SMALL_RUN


def make(root: Path, name: str, complete: bool):
    """A checkpoint as written before digests were recorded (meta.json without a files table)."""
    d = root / name
    d.mkdir(parents=True)
    for f in ("model.pt", "optim.pt", "rank_0.pt"):
        (d / f).write_bytes(b"x")
    if complete:
        (d / "meta.json").write_text(json.dumps({"step": int(name[-8:]), "world": 1}))


def test_incomplete_and_temporary_folders_are_ignored(tmp_path, capsys):
    make(tmp_path, "step_00000010", True)
    make(tmp_path, "step_00000020", True)
    make(tmp_path, "step_00000030", False)        # killed before meta.json was written
    make(tmp_path, ".tmp-step_00000040", True)    # killed before the rename
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_00000010", "step_00000020"]
    assert resolve_resume("auto", tmp_path, DistInfo()).name == "step_00000020"
    assert f"checkpoint {tmp_path / 'step_00000030'} is corrupt (meta.json: missing); using " \
           f"{tmp_path / 'step_00000020'}" in capsys.readouterr().err
    assert resolve_resume("none", tmp_path, DistInfo()) is None
    assert resolve_resume("auto", tmp_path / "missing", DistInfo()) is None


def test_explicit_resume_path_must_be_complete(tmp_path):
    make(tmp_path, "step_00000030", False)
    with pytest.raises(ValueError, match="trainer.resume=.* is not a complete checkpoint"):
        resolve_resume(str(tmp_path / "step_00000030"), tmp_path, DistInfo())


# ----------------------------------------------------------------------------- direct save/load
class Par:
    """The checkpoint hooks of `parallel.Parallelized` for a plain module (single process)."""

    def __init__(self, model):
        self.model = model

    def full_state_dicts(self, optimizer):
        return ckpt.full_state_dicts(self.model, optimizer)

    def load_full_state_dicts(self, optimizer, model_sd, optim_sd, from_rank0):
        ckpt.load_full_state_dicts(self.model, optimizer, model_sd, optim_sd, from_rank0)


Run = namedtuple("Run", "par optimizer scheduler")


def tiny_run() -> Run:
    model = torch.nn.Linear(16, 8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return Run(Par(model), optimizer, torch.optim.lr_scheduler.StepLR(optimizer, 1))


def train_and_save(run: Run, root: Path, step: int, keep: int = 3) -> Path:
    loss = run.par.model(torch.randn(4, 16)).square().mean()
    loss.backward()
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad()
    return save_checkpoint(root, step, DistInfo(), run.par, run.optimizer, run.scheduler,
                           {"pos": step}, {"note": "test"}, keep=keep)


def weights(run: Run) -> dict:
    return {k: v.clone() for k, v in run.par.model.state_dict().items()}


def assert_loads(path: Path, expected: dict, step: int):
    fresh = tiny_run()
    assert load_checkpoint(path, DistInfo(), fresh.par, fresh.optimizer, fresh.scheduler) == \
        (step, {"pos": step})
    got = fresh.par.model.state_dict()
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_meta_records_size_and_digest_and_in_place_changes_are_caught(tmp_path):
    run = tiny_run()
    path = train_and_save(run, tmp_path, 1)
    files = json.loads((path / "meta.json").read_text())["files"]
    assert sorted(files) == ["model.pt", "optim.pt", "rank_0.pt"]
    assert all(files[n]["size"] == (path / n).stat().st_size for n in files)
    assert checkpoint_problem(path) is None
    # same size, one byte flipped, in this process (whose save remembered the folder as good)
    data = bytearray((path / "optim.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / "optim.pt").write_bytes(bytes(data))
    assert checkpoint_problem(path) == "optim.pt: checksum mismatch"


def test_every_checkpoint_corrupt_is_an_error_naming_them(tmp_path):
    run = tiny_run()
    for step in (1, 2):
        (train_and_save(run, tmp_path, step) / "model.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"no usable checkpoint in .*step_00000002 "
                       r"\(model.pt: size mismatch, 0 bytes.*step_00000001 .*not starting fresh"):
        resolve_resume("auto", tmp_path, DistInfo())


def test_explicit_or_direct_load_of_a_corrupt_checkpoint_is_refused(tmp_path):
    run = tiny_run()
    path = train_and_save(run, tmp_path, 1)
    (path / "rank_0.pt").unlink()
    with pytest.raises(CheckpointError, match=r"trainer.resume=.*step_00000001.* is corrupt "
                                              r"\(rank_0.pt: missing\)"):
        resolve_resume(str(path), tmp_path, DistInfo())
    with pytest.raises(CheckpointError, match=r"checkpoint .*step_00000001 is corrupt "
                                              r"\(rank_0.pt: missing\); not loading it"):
        load_checkpoint(path, DistInfo(), run.par, run.optimizer, run.scheduler)


def test_checkpoints_without_digests_still_load(tmp_path, capsys):
    run = tiny_run()
    old = train_and_save(run, tmp_path, 1)
    expected = weights(run)
    new = train_and_save(run, tmp_path, 2)
    for path in (old, new):  # as written before this change
        meta = json.loads((path / "meta.json").read_text())
        del meta["files"]
        (path / "meta.json").write_text(json.dumps(meta))
    assert resolve_resume("auto", tmp_path, DistInfo()) == new
    (new / "optim.pt").write_bytes(b"")
    assert resolve_resume("auto", tmp_path, DistInfo()) == old
    assert f"checkpoint {new} is corrupt (optim.pt: empty); using {old}" in capsys.readouterr().err
    assert_loads(old, expected, 1)


def test_leftover_temporaries_are_removed_with_a_note(tmp_path, capsys):
    run = tiny_run()
    kept = train_and_save(run, tmp_path, 1)
    (tmp_path / ".tmp-step_00000002").mkdir()
    (tmp_path / ".tmp-step_00000002" / "model.pt").write_bytes(os.urandom(100))
    assert clean_temporaries(tmp_path, DistInfo()) == [tmp_path / ".tmp-step_00000002"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [kept.name]
    assert "removed 1 temporary checkpoint folder(s) left by an interrupted save" in \
        capsys.readouterr().out
    assert clean_temporaries(tmp_path / "missing", DistInfo()) == []


def test_save_never_prunes_the_folder_it_just_wrote(tmp_path):
    """Resumed at 1 past a corrupt step 3: with keep=1 the new step 2 must survive."""
    run = tiny_run()
    train_and_save(run, tmp_path, 1)
    (train_and_save(run, tmp_path, 3) / "model.pt").write_bytes(b"")
    path = train_and_save(run, tmp_path, 2, keep=1)
    assert checkpoint_problem(path) is None
    assert resolve_resume("auto", tmp_path, DistInfo()) == path


def _partial_then(exc):
    """A torch.save that writes part of the file, then fails like a full disk."""
    def save(obj, f, *a, **k):
        Path(f).write_bytes(os.urandom(64))
        raise exc()
    return save


ENOSPC = lambda: OSError(errno.ENOSPC, "No space left on device")  # noqa: E731


def _wrapped():
    """torch's RuntimeError around the OSError of the write."""
    err = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
    err.__cause__ = ENOSPC()
    return err


@pytest.mark.parametrize("failure", ["oserror", "wrapped", "torch_no_errno"])
def test_full_disk_fails_clearly_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, failure):
    run = tiny_run()
    prev = train_and_save(run, tmp_path, 1)
    expected = weights(run)
    disk = shutil.disk_usage(tmp_path)
    full = {"now": False}
    if failure == "torch_no_errno":  # torch's own message, no errno: the disk really is full
        def save(obj, f, *a, **k):
            Path(f).write_bytes(os.urandom(64))
            full["now"] = True
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
        monkeypatch.setattr(ckpt.shutil, "disk_usage",
                            lambda p: disk._replace(free=0) if full["now"] else disk)
    else:
        save = _partial_then(ENOSPC if failure == "oserror" else _wrapped)
    real = torch.save
    # the rank file is written first: the disk fills on model.pt
    monkeypatch.setattr(ckpt.torch, "save", lambda obj, f, *a, **k: (
        real(obj, f, *a, **k) if Path(f).name.startswith("rank_") else save(obj, f, *a, **k)))
    with pytest.raises(CheckpointError) as caught:
        train_and_save(run, tmp_path, 2)
    assert str(caught.value) == (f"no space left on {tmp_path} while writing checkpoint step 2 "
                                 f"(the previous checkpoint {prev} is intact)")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [prev.name]  # no temporary left
    assert resolve_resume("auto", tmp_path, DistInfo()) == prev
    assert_loads(prev, expected, 1)


def test_full_disk_is_refused_before_writing(tmp_path, monkeypatch):
    run = tiny_run()
    prev = train_and_save(run, tmp_path, 1)
    disk = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: disk._replace(free=4096))
    monkeypatch.setattr(ckpt.torch, "save", lambda *a, **k: pytest.fail("wrote despite no space"))
    with pytest.raises(CheckpointError, match=rf"^no space left on {tmp_path} while writing "
                       rf"checkpoint step 2 \(the previous checkpoint {prev} is intact\): it needs "
                       r"about 3\.0 MiB, 0\.0 MiB free$"):
        train_and_save(run, tmp_path, 2)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [prev.name]
    assert checkpoint_problem(prev) is None


def test_other_write_failures_are_not_called_a_full_disk(tmp_path, monkeypatch):
    run = tiny_run()
    monkeypatch.setattr(ckpt.torch, "save", _partial_then(lambda: RuntimeError("boom")))
    with pytest.raises(CheckpointError, match=r"could not write checkpoint step 1 in .* "
                       r"\(rank_0.pt on rank 0: RuntimeError: boom\); "
                       r"there is no previous checkpoint"):
        train_and_save(run, tmp_path, 1)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- train.run
def _compose(cache: Path, *overrides):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=SMALL_RUN + [f"data.cache_dir={cache}", *overrides])


COMMON = ["trainer.steps=6", "trainer.ckpt_every=2", "trainer.val_every=0", "trainer.ckpt_keep=2"]


def _losses(out_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(l) for l in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """6 uninterrupted steps, and a run stopped after step 4 (checkpoints 2 and 4)."""
    import train
    root = tmp_path_factory.mktemp("reference")
    train.run(_compose(root / "cache", *COMMON), root / "full")
    train.run(_compose(root / "cache", *COMMON, "trainer.run_steps=4"), root / "split")
    return dict(_losses(root / "full")), root / "split"


def _truncate(f):
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


CORRUPTIONS = {
    "truncated": ("model.pt", _truncate, "size mismatch"),
    "empty": ("model.pt", lambda f: f.write_bytes(b""), "size mismatch, 0 bytes"),
    "meta": ("meta.json", lambda f: f.write_text(f.read_text()[:40]), "unreadable meta.json"),
    "random": ("model.pt", lambda f: f.write_bytes(os.urandom(f.stat().st_size)),
               "checksum mismatch"),
    "no_rank_file": ("rank_0.pt", lambda f: f.unlink(), "missing"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_newest_checkpoint_resumes_exactly_from_the_previous(reference, tmp_path, capsys,
                                                                     case):
    import train
    full, split = reference
    out = tmp_path / "run"
    shutil.copytree(split, out)
    ckpts = out / "checkpoints"
    name, corrupt, why = CORRUPTIONS[case]
    corrupt(ckpts / "step_00000004" / name)
    (ckpts / ".tmp-step_00000006").mkdir()  # a save that crashed too
    clean_temporaries(ckpts, DistInfo())
    train.run(_compose(tmp_path / "cache", *COMMON), out)
    err = capsys.readouterr().err
    prefix = "" if name == "meta.json" else f"{name}: "
    assert f"checkpoint {ckpts / 'step_00000004'} is corrupt ({prefix}{why}" in err
    assert f"; using {ckpts / 'step_00000002'}\n" in err
    resumed = _losses(out)[-4:]  # the resumed run's steps
    assert [s for s, _ in resumed] == [3, 4, 5, 6]
    assert [loss for _, loss in resumed] == [full[s] for s in (3, 4, 5, 6)]
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000004", "step_00000006"]
    assert checkpoint_problem(ckpts / "step_00000004") is None  # rewritten on the way
