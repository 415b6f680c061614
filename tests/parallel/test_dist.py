"""Rank layout from the launcher's environment (parallel/dist.py), without joining a process
group: torchrun's variables as given; srun's tasks through submitit, exported for env://."""
import os

import pytest

from parallel.dist import DistInfo, _env_layout

TORCHRUN = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# task 11 of 16, the 4th on the second of two 8-task nodes
SLURM = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "16", "SLURM_PROCID": "11", "SLURM_LOCALID": "3",
         "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu[007-008]"}


@pytest.fixture
def env(monkeypatch):
    """A clean launcher environment; every variable touched here is restored afterwards
    (set first, so monkeypatch records what to restore, then removed)."""
    for key in (*TORCHRUN, *SLURM, "SUBMITIT_EXECUTOR", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.setenv(key, "unset")
        monkeypatch.delenv(key)
    return monkeypatch


def test_torchrun_variables_are_read_as_given(env):
    env.setenv("WORLD_SIZE", "4")
    env.setenv("RANK", "2")
    env.setenv("LOCAL_RANK", "0")
    for key, value in SLURM.items():  # torchrun inside an sbatch job: torchrun's layout wins
        env.setenv(key, value)
    assert _env_layout() == DistInfo(rank=2, world=4, local_rank=0)
    assert "MASTER_ADDR" not in os.environ


@pytest.mark.parametrize("executor", [None, "slurm"], ids=["srun", "submitit"])
def test_srun_tasks_get_their_layout_from_submitit(env, executor):
    pytest.importorskip("submitit")
    for key, value in SLURM.items():
        env.setenv(key, value)
    if executor:
        env.setenv("SUBMITIT_EXECUTOR", executor)
    assert _env_layout() == DistInfo(rank=11, world=16, local_rank=3)
    # exported for init_process_group's env:// rendezvous, as torchrun would have
    assert os.environ["MASTER_ADDR"] == "gpu007"
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("11", "16", "3")
    assert os.environ["LOCAL_WORLD_SIZE"] == "8"
    port = os.environ["MASTER_PORT"]
    assert 20000 <= int(port) <= 60000
    assert "CUDA_VISIBLE_DEVICES" not in os.environ  # the run picks cuda:<local rank> itself

    # every task of the job derives the same port from the job id; a given address is kept
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.delenv(key)
    env.setenv("SLURM_PROCID", "0")
    env.setenv("SLURM_LOCALID", "0")
    env.setenv("MASTER_ADDR", "10.0.0.7")
    assert _env_layout() == DistInfo(rank=0, world=16, local_rank=0)
    assert (os.environ["MASTER_PORT"], os.environ["MASTER_ADDR"]) == (port, "10.0.0.7")


def test_one_slurm_task_runs_alone(env):
    for key, value in {**SLURM, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}.items():
        env.setenv(key, value)
    assert _env_layout() == DistInfo()
