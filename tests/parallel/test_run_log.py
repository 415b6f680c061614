"""parallel/run_log.py on the CPU: the metrics log and its sink, summary.json, the W&B run id,
the run labels outside a sweep, the FLOP peak, and the step profiler's files and kinds."""
from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from parallel import run_log


class Sink:
    def __init__(self):
        self.rows, self.finished, self.summary = [], False, {}

    def log(self, metrics, step):
        self.rows.append((step, metrics))

    def finish(self):
        self.finished = True


def test_metrics_log_file_console_and_sink(tmp_path, capsys):
    """Rank 0: every row in metrics.jsonl (nulls kept), the sink without nulls and with the row's
    step, one console line per row (floats to 4 significant digits, nulls left out); the sink is
    opened once and finished on close."""
    sink, opened = Sink(), []
    log = run_log.MetricsLog(tmp_path, console=True, is_main=True,
                             open_sink=lambda: opened.append(1) or sink)
    log.log({"step": 1, "loss": 2.345678, "mfu": None})
    log.log({"step": 2, "val_loss": 1.5})
    log.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "loss": 2.345678, "mfu": None}, {"step": 2, "val_loss": 1.5}]
    assert sink.rows == [(1, {"step": 1, "loss": 2.345678}), (2, {"step": 2, "val_loss": 1.5})]
    assert opened == [1] and sink.finished
    assert capsys.readouterr().out.splitlines() == ["step=1 loss=2.346", "step=2 val_loss=1.5"]


def test_metrics_log_other_ranks_write_nothing(tmp_path, capsys):
    log = run_log.MetricsLog(tmp_path, console=True, is_main=False,
                             open_sink=lambda: pytest.fail("a sink opened on rank > 0"))
    log.log({"step": 1, "loss": 1.0})
    log.close()
    assert not (tmp_path / "metrics.jsonl").exists() and capsys.readouterr().out == ""


def test_write_summary_file_and_sink_summary(tmp_path):
    log = run_log.MetricsLog(tmp_path, console=False, is_main=True, open_sink=Sink)
    run_log.write_summary(tmp_path, log, {"steps": 3, "mfu": None, "final_val_loss": 1.25})
    assert json.loads((tmp_path / "summary.json").read_text()) == {
        "steps": 3, "mfu": None, "final_val_loss": 1.25}
    assert log.sink.summary == {"steps": 3, "final_val_loss": 1.25}   # nulls not sent
    log.close()
    plain = run_log.MetricsLog(tmp_path, console=False, is_main=True, open_sink=None)
    run_log.write_summary(tmp_path, plain, {"steps": 4})              # no sink: the file only
    assert json.loads((tmp_path / "summary.json").read_text()) == {"steps": 4}
    plain.close()


def test_wandb_id_is_one_per_run_folder(tmp_path):
    first = run_log._wandb_id(tmp_path)
    assert len(first) == 12 and run_log._wandb_id(tmp_path) == first   # a resume continues it
    other = tmp_path / "other"
    other.mkdir()
    assert run_log._wandb_id(other) != first


def test_run_labels_outside_a_sweep():
    cfg = OmegaConf.create({"run_name": "my-run"})
    assert run_log.run_labels(cfg) == ("my-run", None)


def test_peak_flops():
    cpu = torch.device("cpu")
    assert run_log.peak_flops(123, cpu) == 123e12          # trainer.peak_tflops wins
    assert run_log.peak_flops(None, cpu) is None           # unknown: no MFU
    assert run_log.peak_memory_gb(cpu) > 0                 # the process's peak RSS on the CPU


def test_step_profiler_writes_its_files(tmp_path):
    """One warm-up step, then `steps` profiled ones: profile.txt, a Chrome trace and
    profile.json whose shares of the time per kind add up to 1, the matmuls counted as such;
    later steps are not profiled."""
    prof = run_log.StepProfiler(2, tmp_path, torch.device("cpu"))
    a = torch.randn(128, 128)
    for _ in range(5):
        (a @ a).relu_().sum()
        prof.step()
    assert prof.left == 0
    assert "Self CPU" in (tmp_path / "profile.txt").read_text()
    assert (tmp_path / "profile_trace.json").stat().st_size > 0
    kinds = json.loads((tmp_path / "profile.json").read_text())
    assert abs(sum(kinds["share"].values()) - 1) < 1e-6
    assert kinds["ms"].get("matmul", 0) > 0 and set(kinds["ms"]) <= {
        k for k, _ in run_log.StepProfiler.KINDS} | {"other"}
