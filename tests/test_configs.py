"""Every option of every config group composes and instantiates; experiments too."""
import json
from pathlib import Path

import pytest
import torch

import train
from attn import get_core
from run_configs import CONFIG_DIR
from models import Transformer
from parallel import Mesh, parallelize
from parallel import run_log
from parallel.dist import DistInfo

GROUPS = {g: sorted(p.stem for p in (Path(CONFIG_DIR) / g).glob("*.yaml"))
          for g in ["model", "attn", "parallel", "data", "optim", "logger", "experiment"]}


def test_every_group_has_options():
    assert all(GROUPS.values()), GROUPS


@pytest.mark.parametrize("option", GROUPS["model"])
def test_model_options_instantiate(compose, option):
    cfg = compose(f"model={option}", small=False)
    mcfg = train.build_model_config(cfg, vocab=50257)
    with torch.device("meta"):  # shapes only: a 7b model allocates nothing
        model = Transformer(mcfg)
    assert model.num_params() > 0 and mcfg.vocab_size % cfg.model.vocab_multiple == 0
    assert model.flops_per_token(cfg.trainer.seq_len) > 6 * model.num_params(exclude_embedding=True)


@pytest.mark.parametrize("option", GROUPS["attn"])
def test_attn_options_instantiate(compose, option):
    cfg = compose(f"attn={option}")
    model = Transformer(train.build_model_config(cfg, vocab=257))
    assert all(layer.attn.family == cfg.attn.name for layer in model.layers)
    assert get_core(cfg.attn.name) is type(model.layers[0].attn)


@pytest.mark.parametrize("option", GROUPS["parallel"])
def test_parallel_options_instantiate(compose, option):
    cfg = compose(f"parallel={option}")
    model = Transformer(train.build_model_config(cfg, vocab=257))
    par = parallelize(model, DistInfo(), train.build_engine(cfg.parallel), Mesh())
    assert par.model is model and par.mesh.dp == 1 and par.mesh.cp == 1


@pytest.mark.parametrize("option", GROUPS["data"])
def test_data_options_instantiate(compose, option, tmp_path):
    from data import build_data
    extra = []
    if option == "hf":  # a local json file stands in for a hub dataset
        f = tmp_path / "docs.jsonl"
        f.write_text("".join(f'{{"text": "document {i} " }}\n'.replace("document", "doc " * 40)
                             for i in range(200)))
        extra = ["data.path=null", "data.builder=json", f"data.data_files={f}", "data.tokenizer=bytes", "data.val_fraction=0.2"]
    cfg = compose(f"data={option}", *extra)
    # room for the needle and the question, and recall's longest MQAR instance (64 pairs)
    T = 256 if option in ("passkey", "recall") else 64
    tok, batches, val = build_data(cfg.data, seq_len=T, micro_batch=2, grad_accum=1, dp_rank=0,
                                   dp_world=1, seed=0)
    mb = batches.next_step()[0]
    assert mb["input_ids"].shape == (2, T) and len(val) > 0 and tok.vocab_size >= 257


@pytest.mark.parametrize("option", GROUPS["optim"])
def test_optim_options_instantiate(compose, option):
    cfg = compose(f"optim={option}")
    model = Transformer(train.build_model_config(cfg, vocab=257))
    opt = train.build_optimizer(model, cfg.optim, torch.device("cpu"))
    f = train.lr_lambda(cfg.optim.warmup_steps, cfg.trainer.steps, cfg.optim.min_lr_ratio)
    assert f(0) > 0 and abs(f(cfg.optim.warmup_steps) - 1) < 1e-9
    assert abs(f(cfg.trainer.steps) - cfg.optim.min_lr_ratio) < 1e-9
    n_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_opt == model.num_params()


@pytest.mark.parametrize("option", GROUPS["logger"])
def test_logger_options_instantiate(compose, option, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = compose(f"logger={option}")
    log = train.open_metrics_log(tmp_path, cfg, is_main=True)
    log.log({"step": 1, "loss": 1.5})
    log.close()
    assert '"loss": 1.5' in (tmp_path / "metrics.jsonl").read_text()


@pytest.mark.parametrize("option", GROUPS["experiment"])
def test_experiments_compose(compose, option):
    """Each recipe composes, and its batch arithmetic holds on the world its launch line names."""
    import re
    text = (Path(CONFIG_DIR) / "experiment" / f"{option}.yaml").read_text()
    assert text.splitlines()[1].startswith("# Launch: "), "experiments start with their launch command"
    world = int(m.group(1)) if (m := re.search(r"--nproc_per_node (\d+)", text)) else 1
    cfg = compose(f"experiment={option}", small=False)
    cp = cfg.cp.size
    assert world % cp == 0
    accum = train.grad_accum_steps(cfg.trainer, world // cp)
    from parallel import CPSettings
    CPSettings.from_config(cfg.cp, world=world,
                           tokens_per_micro_batch=cfg.trainer.micro_batch * cfg.trainer.seq_len)
    assert cfg.trainer.seq_len <= cfg.model.max_seq_len and accum >= 1


def test_slurm_launcher_composes(compose):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = hydra_compose("train", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    assert cfg.hydra.launcher.tasks_per_node == 8


# ----------------------------------------------------------------------------- _target_ builders
def test_optim_adam_builds_torch_adam_without_decay(compose):
    cfg = compose("optim=adam")
    model = Transformer(train.build_model_config(cfg, vocab=257))
    opt = train.build_optimizer(model, cfg.optim, torch.device("cpu"))
    assert type(opt) is torch.optim.Adam and [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.0]
    assert opt.param_groups[0]["lr"] == cfg.optim.lr and opt.param_groups[0]["fused"] is False  # auto on CPU


def test_adamw_groups_and_schedule_keep_their_numbers(compose):
    """AdamW: decay on the matrices, not on the embedding or norms; the configured scheduler is
    warmup + cosine over trainer.steps (train.lr_lambda)."""
    cfg = compose("optim.weight_decay=0.05")
    model = Transformer(train.build_model_config(cfg, vocab=257))
    opt = train.build_optimizer(model, cfg.optim, torch.device("cpu"))
    assert type(opt) is torch.optim.AdamW
    decay, no_decay = opt.param_groups
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)
    assert all(p.dim() >= 2 for p in decay["params"])
    assert any(p is model.embed.weight for p in no_decay["params"])
    sched = train.build_scheduler(opt, cfg.optim)
    expect = train.lr_lambda(cfg.optim.warmup_steps, cfg.trainer.steps, cfg.optim.min_lr_ratio)
    for step in range(cfg.trainer.steps + 1):
        assert sched.get_last_lr()[0] == pytest.approx(cfg.optim.lr * expect(step), rel=1e-12), step
        opt.step()
        sched.step()


@pytest.mark.parametrize("override,message", [
    (["optim.fused=maybe"], "optim.fused='maybe' must be auto, true or false"),
    (["optim._target_=torch.optim.AdamX"], "optim (_target_: torch.optim.AdamX): Error locating target"),
    (["+optim.momentum=0.9"], "optim (_target_: torch.optim.AdamW): AdamW.__init__() got an unexpected "
                              "keyword argument 'momentum'"),
    (["optim._partial_=false"], "optim needs _target_ (what to call) and _partial_: true"),
    (["optim.warmup_steps=-1"],
     "optim.scheduler (_target_: train.warmup_cosine): warmup_steps=-1 must be >= 0"),
    (["logger=wandb", "logger._target_=parallel.run_log.no_such_sink"],
     "logger (_target_: parallel.run_log.no_such_sink): Error locating target"),
])
def test_bad_targets_name_the_key(compose, tmp_path, override, message):
    """Optimizer, scheduler and sink are built in this order by train.run; each failure is one
    ValueError naming its config key."""
    import re
    cfg = compose(*override)
    model = Transformer(train.build_model_config(cfg, vocab=257))
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        train.build_scheduler(train.build_optimizer(model, cfg.optim, torch.device("cpu")), cfg.optim)
        train.open_metrics_log(tmp_path, cfg, is_main=True)


def test_logger_sink_gets_every_metrics_line(compose, tmp_path, monkeypatch):
    """logger._target_ is called with the run folder and the config; it receives what
    metrics.jsonl receives (nulls dropped) and is finished on close. jsonl/none build none."""
    got = []

    class Sink:
        log = staticmethod(lambda metrics, step: got.append((step, metrics)))
        finish = staticmethod(lambda: got.append("finished"))

    monkeypatch.setattr(run_log, "wandb_run", lambda out_dir, run_cfg, **kw: got.append((out_dir, kw)) or Sink)
    cfg = compose("logger=wandb", "logger.mode=disabled")
    log = train.open_metrics_log(tmp_path, cfg, is_main=True)
    log.log({"step": 3, "loss": 1.5, "mfu": None})
    log.close()
    assert got == [(tmp_path, {"project": "longctx", "entity": None, "mode": "disabled", "tags": []}),
                   (3, {"step": 3, "loss": 1.5}), "finished"]
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 3, "loss": 1.5, "mfu": None}
    for option in ("jsonl", "none"):
        plain = train.open_metrics_log(tmp_path, compose(f"logger={option}"), is_main=True)
        assert plain.sink is None
        plain.close()


@pytest.mark.slow
def test_optim_adam_trains_and_resumes(compose, tmp_path):
    """optim=adam through train.run: 3 steps, stop, resume from the checkpoint (Adam's state),
    3 more == 6 in one go."""
    def losses(out):
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    args = ("optim=adam", "trainer.val_every=0")
    train.run(compose(*args), tmp_path / "full")
    train.run(compose(*args, "trainer.run_steps=3"), tmp_path / "split")
    saved = torch.load(tmp_path / "split" / "checkpoints" / "step_00000003" / "optim.pt", weights_only=False)
    assert {k for st in saved["optimizer"]["state"].values() for k in st} == {"step", "exp_avg", "exp_avg_sq"}
    train.run(compose(*args), tmp_path / "split")  # trainer.resume=auto
    assert losses(tmp_path / "split") == losses(tmp_path / "full")


def test_engine_is_the_parallel_target(compose):
    """parallel._target_ is called with (model, DistInfo) and the group's keys but backend; an
    option the engine does not take is refused naming the group, before anything is built."""
    cfg = compose("parallel=fsdp")
    model = Transformer(train.build_model_config(cfg, vocab=257))
    cfg.parallel.param_dtype = "fp16"
    with pytest.raises(ValueError, match=r"^parallel.param_dtype='fp16' must be auto, bf16 or fp32$"):
        parallelize(model, DistInfo(), train.build_engine(cfg.parallel), Mesh())
    from omegaconf import OmegaConf
    OmegaConf.set_struct(cfg, False)
    cfg.parallel.param_dtype = "auto"
    cfg.parallel.bucket_cap_mb = 25  # a DDP option
    with pytest.raises(train.ConfigError, match=r"parallel \(_target_: parallel.engines.fsdp\) "
                                                r"does not take these options: bucket_cap_mb"):
        parallelize(model, DistInfo(), train.build_engine(cfg.parallel), Mesh())
    del cfg.parallel.bucket_cap_mb
    cfg.parallel._target_ = "tests.test_configs.wrap_in_marker"  # an engine of one's own
    par = parallelize(model, DistInfo(), train.build_engine(cfg.parallel), Mesh())
    # (Hydra imports tests.test_configs again: compare the class by name)
    assert type(par.module).__name__ == "Marker" and par.module.options == {"param_dtype": "auto"}
    cfg.parallel._target_ = "parallel.engines.no_such_engine"
    with pytest.raises(train.ConfigError, match=r"^parallel \(_target_: parallel.engines.no_such"):
        parallelize(model, DistInfo(), train.build_engine(cfg.parallel), Mesh())


class Marker(torch.nn.Module):
    def __init__(self, model, options):
        super().__init__()
        self.inner, self.options = model, options


def wrap_in_marker(model, info, **options):
    return Marker(model, options)
