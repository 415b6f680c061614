"""eval.py on CPU: the files it writes and their shapes, a refused mismatched config, missing or
incomplete checkpoints, and MQAR learned by the tiny model well above chance."""
import json
import shutil

import pytest
from hydra import compose as hydra_compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import eval as evaluation
import train
from parallel.checkpoint import CheckpointError
from run_configs import CONFIG_DIR


def eval_cfg(*overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return hydra_compose("eval", overrides=list(overrides))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 4-step tiny sdpa run with one checkpoint."""
    from conftest import SMALL_RUN
    root = tmp_path_factory.mktemp("eval")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = hydra_compose("train", overrides=SMALL_RUN + [
            f"data.cache_dir={root / 'cache'}", "trainer.steps=4", "trainer.ckpt_every=4",
            "trainer.val_every=0"])
    train.run(cfg, root / "run")
    return root / "run"


def test_writes_json_and_heatmaps_of_the_asked_shape(tiny_run, tmp_path):
    import matplotlib.image
    cfg = eval_cfg(f"run={tiny_run}", f"out={tmp_path / 'out'}", "eval.samples=2",
                   "eval.passkey_lengths=[160,256]", "eval.depths=[0.0,0.5,1.0]",
                   "eval.mqar_pairs=[2,4]", "eval.mqar_lengths=[8,32,64]", "eval.lengths=[64]",
                   "eval.buckets=4", "eval.val_rows=2")
    result = evaluation.main(cfg, [])
    saved = json.loads((tmp_path / "out/eval.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["step"] == 4 and saved["attn"] == "sdpa" and saved["seq_len"] == 64
    p, m, pos = saved["passkey"], saved["mqar"], saved["position_loss"]["64"]
    assert p["lengths"] == [160, 256] and p["depths"] == [0.0, 0.5, 1.0]
    assert [len(r) for r in p["accuracy"]] == [3, 3]
    assert all(0 <= v <= 1 for r in p["accuracy"] for v in r)
    assert m["pairs"] == [2, 4] and [len(r) for r in m["accuracy"]] == [3, 3]
    assert m["accuracy"][1][0] is None and m["accuracy"][0][0] is not None  # 4 pairs need 10 tokens
    assert len(pos["loss"]) == 4 and pos["edges"] == [0, 16, 32, 48, 64] and sum(pos["tokens"]) > 0
    assert pos["tokens"][-1] <= pos["tokens"][0]  # no bucket collects the positions beyond it
    for name in ("passkey.png", "mqar.png"):
        image = matplotlib.image.imread(tmp_path / "out" / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_position_buckets_count_the_context_a_token_sees():
    import torch
    # rows of 6 without document masks: offsets in the row, whatever the RoPE positions say
    assert evaluation.visible_context((2, 6), None).tolist() == [0, 1, 2, 3, 4, 5] * 2
    # masked: a row starts a segment, and so does every bos (here at flat index 3 and 8)
    cu = torch.tensor([0, 3, 6, 8, 12], dtype=torch.int32)
    assert evaluation.visible_context((2, 6), cu).tolist() == [0, 1, 2, 0, 1, 2,
                                                               0, 1, 0, 1, 2, 3]


def test_a_mismatched_config_is_refused_naming_the_key(tiny_run):
    cfg = eval_cfg(f"run={tiny_run}", "attn=flash", "model.dim=64")
    with pytest.raises(train.ConfigError, match=r"attn.name: 'sdpa' -> 'flash'.*model.dim: 32 -> 64"):
        evaluation.evaluate(cfg, ["attn=flash", "model.dim=64"])
    # overrides equal to the checkpoint's own settings are fine
    cfg = eval_cfg(f"run={tiny_run}", "model.dim=32", "eval.passkey=false", "eval.mqar=false",
                   "eval.position_loss=false")
    assert evaluation.evaluate(cfg, ["model.dim=32"])["step"] == 4


def test_missing_and_incomplete_checkpoints_are_clear_errors(tiny_run, tmp_path):
    with pytest.raises(CheckpointError, match=r"run=.*nowhere: no such folder"):
        evaluation.evaluate(eval_cfg(f"run={tmp_path / 'nowhere'}"))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_run, broken)
    (broken / "checkpoints/step_00000004/meta.json").unlink()  # an interrupted save
    with pytest.raises(CheckpointError, match=r"no usable checkpoint in .*broken"):
        evaluation.evaluate(eval_cfg(f"run={broken}"))
    with pytest.raises(train.ConfigError, match=r"eval needs run=<run folder> or ckpt="):
        evaluation.evaluate(eval_cfg())


@pytest.mark.slow
def test_tiny_model_learns_mqar_well_above_chance(compose, tmp_path):
    """600 steps of data=mqar (4 pairs, 16 keys, 16 values, 64 tokens; about a minute on CPU):
    recall accuracy at 4 pairs >= 0.45 where copying a random stored value scores 0.25 and a
    random value 1/16 (measured: 0.64)."""
    cfg = compose("data=mqar", "data.n_pairs=4", "data.n_keys=16", "data.n_values=16",
                  "model.dim=128", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=4",
                  "trainer.seq_len=64", "trainer.global_batch=32", "trainer.micro_batch=32",
                  "trainer.steps=600", "trainer.log_every=100", "trainer.val_every=600",
                  "trainer.ckpt_every=600", "optim.lr=1e-3", "optim.warmup_steps=20")
    train.run(cfg, tmp_path / "run")
    result = evaluation.evaluate(eval_cfg(f"run={tmp_path / 'run'}", "eval.position_loss=false",
                                          "eval.passkey=false", "eval.mqar_pairs=[4]",
                                          "eval.mqar_lengths=[64]", "eval.samples=64"))
    accuracy = result["mqar"]["accuracy"][0][0]
    assert accuracy >= 0.45, accuracy
