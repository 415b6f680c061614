"""Sharded checkpoints (torch.distributed.checkpoint): written by 2 gloo ranks under FSDP2, resumed
in 1, 2 and 4 processes with equal losses; async writes; the safetensors export; bad settings."""
import json
import math
import shutil
import sys

import pytest
import torch

import train
from parallel.checkpoint import CheckpointError
from parallel.export import export
from run_configs import SMALL_RUN
from test_train import _cli, losses


def _args(*extra):
    args = [a for a in SMALL_RUN if not a.startswith(("trainer.steps", "trainer.ckpt_every",
                                                       "trainer.micro_batch"))]
    return args + ["trainer.steps=6", "trainer.ckpt_every=3", "trainer.val_every=0",
                   "trainer.micro_batch=1", *extra]


def _launch(args, tmp_path, name, nproc):
    launcher = (sys.executable,) if nproc == 1 else (
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc))
    r = _cli(args + [f"hydra.run.dir={tmp_path / name}"], tmp_path, launcher=launcher)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.slow
def test_written_by_two_ranks_resumes_in_one_two_and_four(compose, tmp_path):
    """FSDP2 on 2 ranks writes step 3 sharded (each rank its own file, no model.pt); the run
    continues in 2, in 1 (plain model) and in 4 processes (resharded by DCP): steps 4-6 agree
    (global batch 4 in every case; the reduction order differs, hence 1e-5). Written in the
    background on 2 ranks, the same run is bit-exact."""
    args = _args("parallel=fsdp")
    _launch(args + ["trainer.run_steps=3"], tmp_path, "two", 2)
    step3 = tmp_path / "two/checkpoints/step_00000003"
    meta = json.loads((step3 / "meta.json").read_text())
    assert meta["format"] == "sharded" and meta["world"] == 2
    assert {"state/__0_0.distcp", "state/__1_0.distcp", "state/.metadata",
            "scheduler.pt"} <= set(meta["files"]) and not (step3 / "model.pt").exists()
    for name in ("one", "four"):
        shutil.copytree(tmp_path / "two", tmp_path / name)
    _launch(args, tmp_path, "two", 2)
    _launch(args, tmp_path, "one", 1)
    _launch(args, tmp_path, "four", 4)
    # async writes on 2 ranks (the writer thread's own gloo group): the same run, bit for bit
    _launch(args + ["trainer.ckpt_async=true", "trainer.run_steps=3"], tmp_path, "async", 2)
    _launch(args + ["trainer.ckpt_async=true"], tmp_path, "async", 2)
    two, one, four = (losses(tmp_path / n) for n in ("two", "one", "four"))
    assert sorted(two) == sorted(one) == sorted(four) == list(range(1, 7))
    assert losses(tmp_path / "async") == two
    for s in range(4, 7):
        assert math.isclose(one[s], two[s], rel_tol=1e-5), (s, one[s], two[s])
        assert math.isclose(four[s], two[s], rel_tol=1e-5), (s, four[s], two[s])
    # the 2-rank checkpoint exports in this one process: every parameter, whole
    out = export(step3, tmp_path / "m.safetensors")
    from safetensors.torch import load_file
    tensors = load_file(str(out))
    cfg = compose(*[a for a in _args() if not a.startswith("trainer.micro_batch")],
                  "trainer.micro_batch=1", small=False)
    model = train.Transformer(train.build_model_config(cfg, vocab=257))
    assert {k: tuple(v.shape) for k, v in tensors.items()} == \
        {k: tuple(p.shape) for k, p in model.named_parameters()}


def test_async_sharded_resume_is_bit_exact(compose, tmp_path):
    """ckpt_async: checkpoints written in the background, completed at the next save or the
    end; 3 steps + resume + 3 == 6 in one go, bit for bit, and the last checkpoint is whole."""
    common = ["trainer.steps=6", "trainer.ckpt_every=2", "trainer.val_every=0",
              "trainer.ckpt_format=sharded", "trainer.ckpt_async=true"]
    train.run(compose(*common), tmp_path / "full")
    train.run(compose(*common, "trainer.run_steps=3"), tmp_path / "split")
    train.run(compose(*common), tmp_path / "split")
    full, split = losses(tmp_path / "full"), losses(tmp_path / "split")
    assert sorted(split) == list(range(1, 7))
    assert [full[s] for s in range(1, 7)] == [split[s] for s in range(1, 7)]
    names = sorted(p.name for p in (tmp_path / "full/checkpoints").iterdir())
    assert names == ["step_00000004", "step_00000006"]  # no temporary left behind
    assert json.loads((tmp_path / "full/checkpoints/step_00000006/meta.json").read_text())[
        "format"] == "sharded"


def test_export_reads_both_formats_and_refuses_a_corrupt_one(compose, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file
    for fmt in ("full", "sharded"):
        run = tmp_path / fmt
        train.run(compose("trainer.steps=2", "trainer.ckpt_every=2", "trainer.val_every=0",
                          f"trainer.ckpt_format={fmt}"), run)
        folder = run / "checkpoints/step_00000002"
        out = export(run)  # a run folder: its newest usable checkpoint
        assert out == folder.with_suffix(".safetensors")
        tensors = load_file(str(out))
        model_pt = (torch.load(folder / "model.pt", weights_only=True) if fmt == "full" else None)
        assert len(tensors) > 0 and all(t.dtype == torch.float32 for t in tensors.values())
        if model_pt is not None:
            assert all(torch.equal(tensors[k], model_pt[k]) for k in tensors)
        with safe_open(str(out), "pt") as f:
            assert f.metadata()["step"] == "2" and json.loads(f.metadata()["attn"])["name"] == "sdpa"
        half = load_file(str(export(folder, tmp_path / f"{fmt}_bf16.safetensors", "bf16")))
        assert all(t.dtype == torch.bfloat16 for t in half.values())
        if fmt == "sharded":
            assert all(torch.equal(half[k], tensors[k].bfloat16()) for k in tensors)
            shard = folder / "state/__0_0.distcp"
            data = bytearray(shard.read_bytes())
            data[len(data) // 2] ^= 0xFF
            shard.write_bytes(bytes(data))
            with pytest.raises(CheckpointError, match=r"state/__0_0.distcp: checksum mismatch"):
                export(folder)


@pytest.mark.parametrize("override,message", [
    (["trainer.ckpt_format=zip"], "trainer.ckpt_format='zip' must be auto, full or sharded"),
    (["trainer.ckpt_async=maybe"], "trainer.ckpt_async='maybe' must be true or false"),
    (["trainer.ckpt_format=full", "trainer.ckpt_async=true"],
     "trainer.ckpt_async=true needs trainer.ckpt_format=sharded"),
    (["trainer.ckpt_async=true"], "trainer.ckpt_async=true needs sharded checkpoints"),
])
def test_bad_checkpoint_settings_name_the_key(compose, tmp_path, override, message):
    with pytest.raises(ValueError, match="^" + message.replace(".", r"\.")):
        train.run(compose(*override), tmp_path / "run")
