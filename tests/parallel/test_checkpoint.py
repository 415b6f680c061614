"""Checkpoint discovery: only complete folders count, so a kill mid-write loses nothing older."""
from pathlib import Path

import pytest

from parallel.checkpoint import complete_checkpoints, resolve_resume
from parallel.dist import DistInfo


def make(root: Path, name: str, complete: bool):
    d = root / name
    d.mkdir(parents=True)
    (d / "model.pt").write_bytes(b"x")
    if complete:
        (d / "meta.json").write_text("{}")


def test_incomplete_and_temporary_folders_are_ignored(tmp_path):
    make(tmp_path, "step_00000010", True)
    make(tmp_path, "step_00000020", True)
    make(tmp_path, "step_00000030", False)        # killed before meta.json was written
    make(tmp_path, ".tmp-step_00000040", True)    # killed before the rename
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_00000010", "step_00000020"]
    assert resolve_resume("auto", tmp_path, DistInfo()).name == "step_00000020"
    assert resolve_resume("none", tmp_path, DistInfo()) is None
    assert resolve_resume("auto", tmp_path / "missing", DistInfo()) is None


def test_explicit_resume_path_must_be_complete(tmp_path):
    make(tmp_path, "step_00000030", False)
    with pytest.raises(ValueError, match="trainer.resume=.* is not a complete checkpoint"):
        resolve_resume(str(tmp_path / "step_00000030"), tmp_path, DistInfo())
