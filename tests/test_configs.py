"""Every option of every config group composes and instantiates; experiments too."""
from pathlib import Path

import pytest
import torch

import train
from attn import get_core
from run_configs import CONFIG_DIR
from models import Transformer
from parallel import parallelize
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
    par = parallelize(model, DistInfo(), cfg.parallel)
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
    tok, batches, val = build_data(cfg.data, seq_len=64, micro_batch=2, grad_accum=1, dp_rank=0,
                                   dp_world=1, seed=0)
    mb = batches.next_step()[0]
    assert mb["input_ids"].shape == (2, 64) and len(val) > 0 and tok.vocab_size >= 257


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
    log = train.MetricsLog(tmp_path, cfg.logger, cfg, is_main=True)
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
    cp = cfg.parallel.cp
    assert world % cp == 0
    accum = train.grad_accum_steps(cfg.trainer, world // cp)
    if cp > 1:
        train.check_context_parallel(cfg, cp)
    assert cfg.trainer.seq_len <= cfg.model.max_seq_len and accum >= 1


def test_slurm_launcher_composes(compose):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = hydra_compose("train", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    assert cfg.hydra.launcher.tasks_per_node == 8
