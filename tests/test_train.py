"""train.py end to end on CPU: steps, resume bit-exactness, DDP under torchrun, bad settings."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from run_configs import SMALL_RUN

ROOT = Path(__file__).resolve().parents[1]


def losses(out_dir: Path, key="loss"):
    rows = [json.loads(l) for l in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


def test_a_few_steps_end_to_end(compose, tmp_path):
    cfg = compose("trainer.steps=6")
    val = train.run(cfg, tmp_path / "run")
    assert math.isfinite(val)
    got = losses(tmp_path / "run")
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    assert got[6] < got[1]  # learning something already
    rows = [json.loads(l) for l in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert {"lr", "grad_norm", "tokens_per_s", "tgs", "peak_mem_gb"} <= rows[0].keys()
    assert [r["step"] for r in rows if "val_loss" in r] == [3, 6]
    ckpts = sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir())
    assert ckpts == ["step_00000003", "step_00000006"]


def test_resume_is_bit_exact(compose, tmp_path):
    """10 steps, stop, resume, 10 more == 20 uninterrupted (same schedule), bit for bit."""
    common = ["trainer.steps=20", "trainer.ckpt_every=5", "trainer.val_every=0"]
    train.run(compose(*common), tmp_path / "full")
    train.run(compose(*common, "trainer.run_steps=10"), tmp_path / "split")
    assert max(losses(tmp_path / "split")) == 10
    train.run(compose(*common), tmp_path / "split")  # resume=auto picks step 10
    full, split = losses(tmp_path / "full"), losses(tmp_path / "split")
    assert sorted(split) == list(range(1, 21))
    assert [full[s] for s in range(1, 21)] == [split[s] for s in range(1, 21)]


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(compose, tmp_path, monkeypatch):
    calls = {"n": 0}
    forward = train.Transformer.forward

    def poisoned(self, *a, **k):
        out = forward(self, *a, **k)
        calls["n"] += 1
        if self.training and calls["n"] > 8:  # 2 micro-batches per step: step 5 goes bad
            return out[0] * float("nan"), out[1]
        return out

    monkeypatch.setattr(train.Transformer, "forward", poisoned)
    with pytest.raises(FloatingPointError, match="non-finite loss .* step 5"):
        train.run(compose("trainer.steps=8", "trainer.ckpt_every=2", "trainer.val_every=0"),
                  tmp_path / "run")
    names = sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir())
    assert names == ["step_00000002", "step_00000004"]
    state = torch.load(tmp_path / "run/checkpoints/step_00000004/model.pt")
    assert all(torch.isfinite(t).all() for t in state.values())


@pytest.mark.parametrize("override,message", [
    (["trainer.global_batch=5"], "trainer.global_batch=5 must be a positive multiple"),
    (["trainer.seq_len=8192"], "trainer.seq_len=8192 exceeds model.max_seq_len=4096"),
    (["trainer.device=cuda"], "trainer.device=cuda but no CUDA"),
    (["data=hf", "data.tokenizer=bytes", "data.path=/nonexistent/corpus"], "data.path"),
    (["cp.size=2"], "cp.size=2 must be >= 1 and divide the number of processes"),
    (["cp.ulysses=2"], "cp.ulysses=2 must be >= 1 and divide cp.size=1"),
])
def test_bad_settings_name_the_key(compose, tmp_path, override, message):
    if "cuda" in message and torch.cuda.is_available():
        pytest.skip("machine has CUDA")
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("=", "=")):
        train.run(compose(*override), tmp_path / "run")


def test_context_parallel_settings_are_checked_before_any_work(compose, tmp_path):
    """train.run validates the cp group first (parallel/context.py CPSettings, tested there):
    an impossible setting ends with the key and the rule before data or model are built."""
    with pytest.raises(ValueError, match=r"cp.size=2 must be >= 1 and divide the number of "
                                         r"processes \(1\)"):
        train.run(compose("cp.size=2"), tmp_path / "run")
    with pytest.raises(ValueError, match=r"cp.layout='diagonal' must be one of"):
        train.run(compose("cp.layout=diagonal"), tmp_path / "run")


def _cli(args, tmp_path, launcher=(sys.executable,), env_extra=None):
    env = dict(os.environ, LONGCTX_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    env.update(env_extra or {})
    return subprocess.run([*launcher, str(ROOT / "train.py"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)


def test_cli_errors_are_one_line(tmp_path):
    r = _cli(["trainer.global_batch=3", "trainer.micro_batch=2"], tmp_path)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1].startswith("error: trainer.global_batch=3"), r.stderr
    r = _cli(["attn=nope"], tmp_path)
    assert r.returncode != 0 and "Available options in 'attn'" in r.stderr and "sdpa" in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["parallel=fsdp"], ["cp.size=2"],
                                   ["cp.size=2", "cp.strategy=ulysses",
                                    "cp.layout=contiguous"]],
                         ids=["ddp", "fsdp", "cp2-allgather-zigzag", "cp2-ulysses-contiguous"])
def test_torchrun_two_processes_match_one(tmp_path, extra):
    """2 gloo ranks (DDP with grad_accum 1, or one sequence split by context parallelism) ==
    1 process with the same global batch."""
    args = [a for a in SMALL_RUN if not a.startswith(("trainer.steps", "trainer.ckpt_every"))]
    args += ["trainer.steps=4", "trainer.ckpt_every=0", "trainer.val_every=4"]
    one = _cli(args + [f"hydra.run.dir={tmp_path / 'one'}"], tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _cli(args + extra + [f"hydra.run.dir={tmp_path / 'two'}"], tmp_path,
               launcher=(sys.executable, "-m", "torch.distributed.run", "--standalone",
                         "--nproc_per_node", "2"))
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for s in a:
        assert math.isclose(a[s], b[s], rel_tol=1e-5), (s, a[s], b[s])
    va, vb = losses(tmp_path / "one", "val_loss"), losses(tmp_path / "two", "val_loss")
    assert math.isclose(va[4], vb[4], rel_tol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("attn", ["flash", "linear", "lightning", "moba", "nsa"])
def test_context_parallel_training_matches_one_process(tmp_path, attn):
    """`torchrun --nproc_per_node 2 train.py attn=<family> cp.size=2` (auto strategy: allgather
    for flash and moba, lasp for the linear families) == one process, loss for loss."""
    args = [a for a in SMALL_RUN if not a.startswith(("trainer.steps", "trainer.ckpt_every"))]
    args += [f"attn={attn}", "trainer.steps=3", "trainer.ckpt_every=0", "trainer.val_every=3"]
    if attn == "moba":
        args += ["attn.block_size=8"]  # several blocks per 64-token row
    if attn == "nsa":
        args += ["attn.cmp_block=8", "attn.cmp_stride=4", "attn.sel_block=8", "attn.topk=3",
                 "attn.window=16"]
    one = _cli(args + [f"hydra.run.dir={tmp_path / 'one'}"], tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    _torchrun(args + ["cp.size=2"], tmp_path, "two")
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for s in a:
        assert math.isclose(a[s], b[s], rel_tol=1e-5), (attn, s, a[s], b[s])


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["attn=flash"], ["parallel=fsdp", "attn=lightning"],
                                   ["cp.size=2", "model.layer_pattern=[lightning,flash]"]],
                         ids=["ddp-flash", "fsdp-lightning", "cp2-hybrid"])
def test_compiled_training_under_torchrun_matches_eager_one_process(tmp_path, extra):
    """`trainer.compile=true` under 2 gloo ranks (DDP, FSDP2, context parallelism with the
    hybrid model's lasp and allgather attends left out of the graph) == the eager single-process
    run of the same model, loss for loss (fp32; compiled code may reorder reductions: 1e-4
    relative). The linear-family blocks with micro_batch 2 and documents are the case that
    needed cu_seqlens marked dynamic from the first compile (train.py `_inputs`)."""
    args = [a for a in SMALL_RUN if not a.startswith(("trainer.steps", "trainer.ckpt_every"))]
    args += ["trainer.steps=3", "trainer.ckpt_every=0", "trainer.val_every=0"]
    model_args = [a for a in extra if a.startswith(("attn=", "model."))]
    extra = [a for a in extra if a not in model_args]
    args += model_args
    one = _cli(args + [f"hydra.run.dir={tmp_path / 'one'}"], tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    _torchrun(args + extra + ["trainer.compile=true"], tmp_path, "two")
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for s in a:
        assert math.isclose(a[s], b[s], rel_tol=1e-4), (s, a[s], b[s])


def _torchrun(args, tmp_path, name, nproc=2):
    r = _cli(args + [f"hydra.run.dir={tmp_path / name}"], tmp_path,
             launcher=(sys.executable, "-m", "torch.distributed.run", "--standalone",
                       "--nproc_per_node", str(nproc)))
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.slow
def test_fsdp_resume_under_torchrun_is_exact(tmp_path):
    """FSDP2 on 2 ranks with activation checkpointing: 3 steps + resume + 3 == 6 in one go."""
    args = [a for a in SMALL_RUN if not a.startswith(("trainer.steps", "trainer.ckpt_every"))]
    args += ["parallel=fsdp", "trainer.activation_checkpointing=true", "trainer.steps=6",
             "trainer.ckpt_every=3", "trainer.val_every=0", "trainer.micro_batch=1"]
    _torchrun(args, tmp_path, "full")
    _torchrun(args + ["trainer.run_steps=3"], tmp_path, "split")
    _torchrun(args, tmp_path, "split")
    full, split = losses(tmp_path / "full"), losses(tmp_path / "split")
    assert sorted(split) == list(range(1, 7))
    assert [full[s] for s in range(1, 7)] == [split[s] for s in range(1, 7)]


@pytest.mark.slow
def test_torchrun_ulysses_inside_context_parallel_matches_one_process(tmp_path):
    """`torchrun --nproc_per_node 4 train.py cp.size=4 cp.ulysses=2` on a hybrid
    lightning/sdpa model (Ulysses pairs around lasp and allgather over the outer pair) == one
    process, loss for loss."""
    args = [a for a in SMALL_RUN if not a.startswith(("trainer.steps", "trainer.ckpt_every"))]
    args += ["model.layer_pattern=[lightning,sdpa]", "trainer.steps=2", "trainer.ckpt_every=0",
             "trainer.val_every=0"]
    one = _cli(args + [f"hydra.run.dir={tmp_path / 'one'}"], tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    _torchrun(args + ["cp.size=4", "cp.ulysses=2"], tmp_path, "four", nproc=4)
    a, b = losses(tmp_path / "one"), losses(tmp_path / "four")
    assert sorted(a) == sorted(b) == [1, 2]
    for s in a:
        assert math.isclose(a[s], b[s], rel_tol=1e-5), (s, a[s], b[s])


def test_no_validation_needs_no_validation_split(compose, tmp_path):
    """trainer.val_every=0 reads no validation split: rows longer than that split (96k tokens)
    train (the run's result is then its last training loss)."""
    # linear attention: its CPU path is linear in T (sdpa's took 6 minutes at 128k on CI)
    long_rows = ["attn=linear", "trainer.seq_len=131072", "model.max_seq_len=131072",
                 "trainer.global_batch=1", "trainer.micro_batch=1", "trainer.steps=2",
                 "trainer.ckpt_every=0"]
    with pytest.raises(ValueError, match="validation corpus"):
        train.run(compose(*long_rows), tmp_path / "with_val")
    result = train.run(compose(*long_rows, "trainer.val_every=0"), tmp_path / "no_val")
    got = losses(tmp_path / "no_val")
    assert sorted(got) == [1, 2] and result == got[2]
    assert not any("val_loss" in l for l in (tmp_path / "no_val/metrics.jsonl").read_text().splitlines())


def test_hybrid_layer_options_per_family(compose):
    """model.layer_options sets the options of a layer_pattern family other than attn=; the
    rest of its options are its configs/attn/<family>.yaml defaults; bad keys are named."""
    from models import Transformer
    cfg = compose("attn=lightning", "model.layer_pattern=[lightning,moba,swa]",
                  "model.n_layers=3",
                  "+model.layer_options.moba.block_size=8", "attn.decay_base=4")
    model = Transformer(train.build_model_config(cfg, 256))
    light, moba, swa = (model.layers[i].attn for i in range(3))
    assert (moba.block_size, moba.topk) == (8, 3)          # override, yaml default
    assert swa.window == 4096                               # configs/attn/swa.yaml
    assert light.family == "lightning" and moba.family == "moba"
    with pytest.raises(ValueError, match=r"model.layer_options.moba: unknown key\(s\) blocks"):
        train.build_model_config(compose("attn=lightning", "model.layer_pattern=[lightning,moba]",
                                         "+model.layer_options.moba.blocks=8"), 256)
    with pytest.raises(ValueError, match=r"model.layer_options.flash: options for a "
                                         r"model.layer_pattern family other than attn=lightning"):
        train.build_model_config(compose("attn=lightning", "model.layer_pattern=[lightning,moba]",
                                         "+model.layer_options.flash.qk_norm=true"), 256)


@pytest.mark.parametrize("override,message", [
    ("trainer.steps=-5", "trainer.steps=-5 must be an integer >= 1"),
    ("trainer.log_every=0", "trainer.log_every=0 must be an integer >= 1"),
    ("trainer.seq_len=abc", "trainer.seq_len='abc' must be an integer >= 1"),
    ("trainer.micro_batch=-2", "trainer.micro_batch=-2 must be an integer >= 1"),
    ("trainer.global_batch=2.5", "trainer.global_batch=2.5 must be an integer >= 1"),
    ("trainer.val_every=-1", "trainer.val_every=-1 must be an integer >= 0 (0: off)"),
    ("trainer.ckpt_every=-1", "trainer.ckpt_every=-1 must be an integer >= 0 (0: off)"),
    ("trainer.ckpt_keep=0", "trainer.ckpt_keep=0 must be an integer >= 1"),
    ("trainer.prefetch=0", "trainer.prefetch=0 must be an integer >= 1"),
    ("trainer.profile_steps=-1", "trainer.profile_steps=-1 must be an integer >= 0 (0: off)"),
    ("trainer.run_steps=0", "trainer.run_steps=0 must be an integer >= 1 or null"),
    ("optim.warmup_steps=-3", "optim.warmup_steps=-3 must be an integer >= 0 (0: off)"),
    ("optim.lr=-1", "optim.lr=-1 must be a number > 0"),
    ("trainer.resume=true", "trainer.resume=True must be auto, none or a checkpoint folder path"),
])
def test_loop_settings_are_checked_before_any_work(compose, tmp_path, override, message):
    """train.check_trainer, first thing in train.run: one ValueError naming the key and the rule
    (not a ZeroDivisionError or TypeError later, nor a run that silently does nothing)."""
    import re
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        train.run(compose(override), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def _bad_input(tmp_path, kind):
    """(overrides, the error message) of a setting or corpus that is refused once read."""
    text_files = ["data=hf", "data.tokenizer=bytes", "data.builder=text"]
    if kind == "moba":
        return ["attn=moba", "attn.block_size=0"], "attn.block_size=0 must be an integer >= 1"
    if kind == "val_batches":
        return ["data.val_batches=0"], ("data.val_batches=0 must be an integer >= 1 (validation "
                                        "micro-batches per evaluation); trainer.val_every=0 turns "
                                        "validation off")
    if kind == "binary":
        (tmp_path / "bin.txt").write_bytes(b"text " + bytes(range(128, 256)))
        return text_files + [f"data.data_files={tmp_path / 'bin.txt'}"], (
            f"data.data_files: {tmp_path / 'bin.txt'} is not UTF-8 text (byte 0x80 at offset 5); "
            "convert it to UTF-8 or leave it out")
    (tmp_path / "empty.txt").write_text("")
    return text_files + [f"data.data_files={tmp_path / 'empty.txt'}"], (
        f"data.data_files=[{str(tmp_path / 'empty.txt')!r}] holds no text for the hf-train "
        "corpus: no non-empty document")


@pytest.mark.parametrize("kind", ["moba", "val_batches", "binary", "empty"])
def test_bad_inputs_name_the_key_or_file(compose, tmp_path, monkeypatch, kind):
    import re

    import datasets
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    overrides, message = _bad_input(tmp_path, kind)
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        train.run(compose(*overrides), tmp_path / "run")


def test_nonfinite_gradient_norm_is_named(compose, tmp_path, monkeypatch):
    """A finite loss with a non-finite gradient norm is reported as the gradient norm's fault."""
    calls = {"n": 0}
    forward = train.Transformer.forward

    def poisoned(self, *a, **k):
        out = forward(self, *a, **k)
        calls["n"] += 1
        if self.training and calls["n"] > 8:  # 2 micro-batches per step: step 5's gradients
            out[0].register_hook(lambda g: g * float("nan"))
        return out

    monkeypatch.setattr(train.Transformer, "forward", poisoned)
    with pytest.raises(FloatingPointError, match=r"^non-finite gradient norm nan at step 5 "
                                                 r"\(loss \d+(\.\d+)?\); stopped without updating "
                                                 r"\(last good checkpoint: .*step_00000004\)$"):
        train.run(compose("trainer.steps=8", "trainer.ckpt_every=2", "trainer.val_every=0"),
                  tmp_path / "run")


def test_cli_bad_settings_and_inputs_are_one_line(tmp_path):
    """`python train.py ...` ends each with `error: <message>` as its last stderr line."""
    cases = [(["trainer.seq_len=abc"], "trainer.seq_len='abc' must be an integer >= 1"),
             (["trainer.resume=true"],
              "trainer.resume=True must be auto, none or a checkpoint folder path"),
             *(_bad_input(tmp_path, kind) for kind in ("moba", "binary"))]
    env = {"HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf_cache")}
    for overrides, message in cases:
        small = [a for a in SMALL_RUN if "data=hf" not in overrides or "max_bytes" not in a]
        r = _cli(small + overrides, tmp_path, env_extra=env)
        assert r.returncode != 0
        assert r.stderr.strip().splitlines()[-1] == f"error: {message}", r.stderr[-3000:]
