"""scripts/summarize.py on hand-written run folders (metrics.jsonl, summary.json, Hydra
overrides, eval.json): the table's rows, order and columns in Markdown and CSV, a run without
summary.json, the eval columns, and the error on a folder without runs (no training); and a
real two-run multirun of the tiny model."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import summarize  # noqa: E402

FIXED = ["run", "status", "attn", "model", "seq_len", "steps", "final_val_loss",
         "final_train_loss", "tokens_per_s", "mfu", "peak_mem_gb", "passkey_acc", "mqar_acc",
         "loss_last_bucket"]


def make_run(folder: Path, overrides=None, summary=None, metrics=(), ev=None, config=None):
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    if overrides is not None:
        (folder / ".hydra").mkdir()
        (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if config is not None:
        (folder / ".hydra").mkdir(exist_ok=True)
        (folder / ".hydra" / "config.yaml").write_text(config)
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps(summary))
    if ev is not None:
        (folder / "eval").mkdir()
        (folder / "eval" / "eval.json").write_text(json.dumps(ev))


def done_summary(attn, seq_len, val_loss, tok_s):
    return {"run_name": f"tiny-{attn}", "attn": attn, "model": "tiny", "seq_len": seq_len,
            "steps": 20, "params": 1.6e6, "final_val_loss": val_loss, "final_train_loss": 2.5,
            "tokens_per_s": tok_s, "mfu": None, "peak_mem_gb": 0.5, "wall_s": 30.0}


def sweep(root: Path):
    """A multirun over attn= and trainer.seq_len= (steps shared): moba beats flash on loss."""
    log = [{"step": 10, "loss": 3.0, "tokens_per_s": 1000.0, "mfu": None, "peak_mem_gb": 0.4}]
    make_run(root / "0-attn=flash,trainer.seq_len=512",
             ["attn=flash", "trainer.seq_len=512", "trainer.steps=20"],
             done_summary("flash", 512, 2.71828, 123456.0), log)
    make_run(root / "1-attn=moba,trainer.seq_len=1024",
             ["attn=moba", "trainer.seq_len=1024", "trainer.steps=20"],
             done_summary("moba", 1024, 2.5, 98765.0), log,
             ev={"passkey": {"lengths": [256, 512], "depths": [0.0, 0.5],
                             "accuracy": [[1.0, 0.5], [0.5, 0.0]]},
                 "mqar": {"pairs": [4, 8], "lengths": [256], "accuracy": [[0.75], [0.25]]},
                 "position_loss": {"edges": [0, 256, 512], "loss": [3.1, 2.2]}})


def md_rows(md: str) -> list[list[str]]:
    lines = [x for x in md.splitlines() if x.startswith("|")]
    return [[c.strip() for c in x.strip("|").split("|")] for x in lines[:1] + lines[2:]]


def test_two_runs_one_table_sorted_by_val_loss_with_the_swept_keys(tmp_path, capsys):
    sweep(tmp_path)
    assert summarize.main([str(tmp_path)]) == 0
    header, *rows = md_rows((tmp_path / "summary.md").read_text())
    assert header == FIXED + ["trainer.seq_len"]  # attn= shows in the attn column; steps equal
    # runs are named by the swept keys only (trainer.steps=20 is common to both)
    assert [r[0] for r in rows] == ["attn=moba,trainer.seq_len=1024",
                                    "attn=flash,trainer.seq_len=512"]
    moba, flash = (dict(zip(header, r)) for r in rows)
    assert (moba["status"], moba["attn"], moba["trainer.seq_len"]) == ("done", "moba", "1024")
    assert (flash["final_val_loss"], flash["tokens_per_s"], flash["mfu"]) == ("2.718", "123.5k", "")
    assert "| attn | model |" in capsys.readouterr().out  # the table is printed too
    with open(tmp_path / "summary.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["attn"] for r in table] == ["moba", "flash"]
    assert table[1]["final_val_loss"] == "2.71828" and table[1]["tokens_per_s"] == "123456.0"
    assert table[0]["trainer.seq_len"] == "1024" and table[1]["mfu"] == ""
    assert (tmp_path / "summary.png").stat().st_size > 0


def test_eval_columns_are_means_and_the_last_bucket(tmp_path):
    sweep(tmp_path)
    summarize.main([str(tmp_path), "--out", str(tmp_path / "report")])
    with open(tmp_path / "report" / "summary.csv", newline="") as f:
        moba, flash = list(csv.DictReader(f))
    assert float(moba["passkey_acc"]) == 0.5 and float(moba["mqar_acc"]) == 0.5
    assert float(moba["loss_last_bucket"]) == 2.2
    assert flash["passkey_acc"] == flash["mqar_acc"] == flash["loss_last_bucket"] == ""


def test_a_run_without_summary_json_is_incomplete_and_read_from_metrics(tmp_path):
    sweep(tmp_path / "a")
    logs = [{"step": s, "loss": 4.0 - s / 10, "tokens_per_s": t, "mfu": m, "peak_mem_gb": g}
            for s, t, m, g in [(1, 10.0, None, 1.0), (2, 2000.0, 0.25, 1.5),
                               (3, 4000.0, 0.5, 2.0), (4, 3000.0, 0.75, 2.5)]]
    make_run(tmp_path / "b" / "crashed", None, None,
             logs[:2] + [{"step": 2, "val_loss": 3.5}, {"step": 2, "ckpt_s": 0.1}] + logs[2:],
             config="model:\n  name: tiny\nattn:\n  name: swa\ntrainer:\n  seq_len: 256\n")
    with open(tmp_path / "b" / "crashed" / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # killed mid-line
    assert summarize.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out",
                           str(tmp_path / "out")]) == 0
    with open(tmp_path / "out" / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows][2] == "crashed"  # val 3.5: after both finished runs
    row = rows[2]
    assert row["status"] == "incomplete" and row["trainer.seq_len"] == ""
    assert (row["attn"], row["model"], row["seq_len"]) == ("swa", "tiny", "256")
    assert (row["steps"], row["final_val_loss"], row["final_train_loss"]) == ("4", "3.5", "3.6")
    # median over the log rows after the first (the first holds compilation)
    assert (row["tokens_per_s"], row["mfu"], row["peak_mem_gb"]) == ("3000.0", "0.75", "2.5")
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "| crashed | incomplete | swa | tiny | 256 | 4 | 3.5 | 3.6 | 3.0k | 75.0% | 2.50 |" in md


def test_a_run_with_nothing_but_metrics_has_empty_cells(tmp_path):
    make_run(tmp_path / "bare")
    assert summarize.main([str(tmp_path)]) == 0
    with open(tmp_path / "summary.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["run"] == "bare" and row["status"] == "incomplete"
    assert all(row[c] == "" for c in FIXED[2:])


def test_overrides_fill_the_fixed_columns_of_a_run_that_wrote_no_summary(tmp_path):
    make_run(tmp_path / "0", ["attn=nsa", "+model=125m", "trainer.seq_len=2048"])
    make_run(tmp_path / "1", ["attn=nsa", "+model=125m", "trainer.seq_len=4096"])
    summarize.main([str(tmp_path)])
    with open(tmp_path / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[len(FIXED):] == ["trainer.seq_len"]  # attn and model are equal
    assert [(r["attn"], r["model"], r["seq_len"]) for r in rows] == [("nsa", "125m", "2048"),
                                                                     ("nsa", "125m", "4096")]


def test_a_folder_without_runs_is_an_error(tmp_path):
    (tmp_path / "empty" / "0-attn=flash").mkdir(parents=True)
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "summarize.py"),
                        str(tmp_path / "empty")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip() == f"error: no run folders (metrics.jsonl) under {tmp_path / 'empty'}"
    assert not (tmp_path / "empty" / "summary.md").exists()


@pytest.mark.slow
def test_a_two_run_multirun_of_the_tiny_model_reads_as_one_table(tmp_path):
    """`python train.py -m attn=sdpa,linear ...` (two runs, a few steps each), then
    summarize.py: one row per run, with the family, tokens/s and validation loss of each."""
    import os
    sweep = tmp_path / "multirun"
    env = dict(os.environ, LONGCTX_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "-m", "attn=sdpa,linear",
                        "model.dim=32", "model.n_layers=2", "model.n_heads=4",
                        "model.n_kv_heads=2", "trainer.seq_len=64", "trainer.global_batch=4",
                        "trainer.micro_batch=2", "trainer.steps=4", "trainer.log_every=1",
                        "trainer.val_every=4", "trainer.ckpt_every=0", "trainer.progress=false",
                        "data.max_bytes=300000", "data.val_batches=2", "logger=jsonl",
                        "logger.console=false", f"hydra.sweep.dir={sweep}"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([sys.executable, str(ROOT / "scripts/summarize.py"), str(sweep)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    with open(sweep / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(row["attn"] for row in rows) == ["linear", "sdpa"]
    assert all(row["status"] == "done" and float(row["tokens_per_s"]) > 0
               and float(row["final_val_loss"]) > 0 for row in rows)
    assert {row["run"] for row in rows} == {"attn=sdpa", "attn=linear"}
