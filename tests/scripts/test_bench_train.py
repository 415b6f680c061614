"""scripts/bench/bench_train.py (and its train_plan.py, train_report.py): planning, metric
parsing, failure classification and the longest-T search as functions, then the whole pipeline on
CPU (tiny model, train.py and the HF anchor as subprocesses, JSON + Markdown out)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "scripts" / "bench"
sys.path.insert(0, str(BENCH))

import bench_train as bt  # noqa: E402
import train_plan as tp  # noqa: E402
import train_report as tr  # noqa: E402

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


def test_batch_shape_keeps_tokens_per_step_and_caps_micro_batch():
    assert tp.batch_shape(2048, 32768, 32768) == (16, 16)
    assert tp.batch_shape(8192, 32768, 32768) == (4, 4)
    assert tp.batch_shape(8192, 32768, 16384) == (4, 2)       # accumulation makes up the rest
    assert tp.batch_shape(131072, 32768, 32768) == (1, 1)     # at least one row
    assert tp.batch_shape(2048, 24576, 8192) == (12, 4)       # micro_batch divides global_batch
    assert tp.parse_size("128k", "--x") == 131072 and tp.parse_size("2M", "--x") == 2 << 20
    with pytest.raises(SystemExit, match="--seqlens"):
        tp.parse_sizes("8k,lots", "--seqlens")


def test_dry_run_prints_one_command_per_run(capsys):
    bt.main(["--dry-run", "--seqlens", "8k,128k", "--families", "flash,hybrid",
             "--compile", "false,true", "--longest", "lightning:512k"])
    lines = [x for x in capsys.readouterr().out.splitlines() if not x.startswith("#")]
    # per T: one HF anchor + 2 families x 2 compile settings; then the first longest run
    assert len(lines) == 2 * (1 + 4) + 1
    ours = [x for x in lines if "train.py" in x]
    assert all("trainer.val_every=0" in x and "logger=jsonl" in x
               and "data.document_mask=false" in x for x in ours)
    assert sum("trainer.compile=true" in x for x in ours[:-1]) == 4
    assert any("model.layer_pattern=[lightning,lightning,lightning,lightning,lightning,lightning,"
               "lightning,flash]" in x for x in ours)
    long_t = [x for x in ours if "trainer.seq_len=131072" in x]
    assert long_t and all("trainer.activation_checkpointing=true" in x and "trainer.global_batch=1"
                          in x for x in long_t)
    assert "trainer.seq_len=524288" in lines[-1] and "optim.warmup_steps=1" in lines[-1]
    hf = [x for x in lines if "hf_anchor.py" in x]
    assert len(hf) == 2 and "--ac" in hf[1] and "--ac" not in hf[0].split()


def test_flag_errors_name_the_flag():
    with pytest.raises(SystemExit, match="--families: unknown family 'flsh'"):
        bt.parse_args(["--families", "flash,flsh"])
    with pytest.raises(SystemExit, match="--compile"):
        bt.parse_args(["--compile", "maybe"])


def _metrics(path, lines):
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_steady_state_leaves_out_the_warmup_windows(tmp_path):
    # 100 tokens per step; windows: steps 1-2 (compile, slow), 3-4, 5-6 (+ a validation line)
    m = _metrics(tmp_path / "metrics.jsonl", [
        dict(step=2, loss=5.0, tokens_per_s=10.0, step_time_s=10.0, mfu=0.01, peak_mem_gb=3.0),
        dict(step=4, loss=4.0, tokens_per_s=100.0, step_time_s=1.0, mfu=0.1, peak_mem_gb=4.0),
        dict(step=4, val_loss=4.2),
        dict(step=6, loss=3.0, tokens_per_s=50.0, step_time_s=2.0, mfu=0.05, peak_mem_gb=4.0)])
    r = tr.read_metrics(m, warmup=2)
    assert r["steps_done"] == 6 and r["steady_steps"] == 4
    assert r["tokens_per_s"] == pytest.approx(400 / 6)        # 4 steps x 100 tokens in 6 s
    assert r["mfu"] == pytest.approx(0.1 / 100 * 400 / 6)
    assert r["peak_mem_gb"] == 4.0 and r["losses"] == [5.0, 4.0, 3.0]
    # a window that straddles the warm-up is left out too
    assert tr.read_metrics(m, warmup=3)["steady_steps"] == 2


def test_failures_are_classified_with_their_reason():
    none = dict(steps_done=0)
    def res(rc, log, timed_out=False):
        return dict(rc=rc, log=log, timed_out=timed_out, wall_s=5)
    oom = "Traceback\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate"
    assert tr.classify(res(1, oom), none)[0] == "oom"
    assert tr.classify(res(-9, "step=1", True), none)[0] == "timeout"
    for nan in ("error: non-finite loss nan at step 2; stopped without updating",
                "error: non-finite gradient norm inf at step 2 (loss 5.41); stopped"):
        assert tr.classify(res(1, nan), none)[0] == "nonfinite"
    s, why = tr.classify(res(1, "x\nerror: data: the corpus makes 0 rows of seq_len=16777216 "
                                "tokens, fewer than one global batch of 1 rows"), none)
    assert s == "data" and "seq_len=16777216" in why
    s, why = tr.classify(res(1, "error: trainer.global_batch=3 must be a positive multiple"), none)
    assert s == "error" and why.startswith("error: trainer.global_batch=3")
    hydra = ("Could not override 'trainer.bogus'.\nTo append to your config use +trainer.bogus=1\n"
             "Key 'bogus' is not in struct\n\nSet the environment variable HYDRA_FULL_ERROR=1 for")
    assert tr.classify(res(1, hydra), none) == ("error", "Could not override 'trainer.bogus'.")
    trace = "Traceback (most recent call last):\n  File x\nValueError: head_dim=48 must be\n  note"
    assert tr.classify(res(1, trace), none) == ("error", "ValueError: head_dim=48 must be")
    s, why = tr.classify(res(-9, "step=1 loss=5.5"), none)
    assert s == "error" and "signal 9" in why
    assert tr.classify(res(0, ""), none)[0] == "error"        # exit 0 without metrics is no success
    assert tr.classify(res(0, ""), dict(steps_done=3)) == ("ok", "")


class FakeRunner:
    """Stands in for Runner: rows from a table T -> (status, losses, step time)."""

    def __init__(self, outcomes, left=float("inf")):
        self.outcomes, self._left, self.asked = outcomes, left, []

    def left(self):
        return self._left

    def run(self, spec, total=None, timeout=None):
        self.asked.append(spec["T"])
        status, losses, step_s = self.outcomes[spec["T"]]
        return dict(spec, status=status, reason="" if status == "ok" else "CUDA out of memory",
                    losses=losses, steps_done=len(losses), step_time_s=step_s,
                    tokens_per_s=spec["T"] / step_s if step_s else None, peak_mem_gb=1.0,
                    wall_s=20 + len(losses) * (step_s or 0))


def test_longest_doubles_until_a_run_fails():
    a = bt.parse_args(["--longest", "flash", "--longest-start", "1k", "--longest-max", "64k"])
    ok = lambda s: ("ok", [5.0, 4.0, 3.5], s)  # noqa: E731
    runner = FakeRunner({1024: ok(1), 2048: ok(2), 4096: ("oom", [], None), 8192: ok(1)})
    rows = []
    out = bt.longest_search(a, runner, "350m", "flash", 1024, rows, lambda: None)
    assert runner.asked == [1024, 2048, 4096]
    assert out["longest_T"] == 2048 and out["stopped_by"].startswith("oom at T=4k")
    assert [r["trained"] for r in rows] == [True, True, False]
    # a loss that does not fall is not "trained", even if the run exits cleanly
    runner = FakeRunner({1024: ok(1), 2048: ("ok", [5.0, 5.1, 5.2], 2)})
    out = bt.longest_search(a, runner, "350m", "flash", 1024, [], lambda: None)
    assert out["longest_T"] == 1024 and "not falling" in out["stopped_by"]
    # the search stops at --longest-max, and before a run predicted not to fit the budget
    runner = FakeRunner({t: ok(1) for t in (1024, 2048, 4096)})
    a2 = bt.parse_args(["--longest", "flash", "--longest-max", "4k"])
    assert bt.longest_search(a2, runner, "m", "flash", 1024, [], lambda: None)["longest_T"] == 4096
    a3 = bt.parse_args(["--longest", "flash", "--budget", "100", "--reserve-s", "0"])
    runner = FakeRunner({1024: ok(10), 2048: ok(40)}, left=60)
    out = bt.longest_search(a3, runner, "m", "flash", 1024, [], lambda: None)
    assert runner.asked == [1024] and out["stopped_by"].startswith("budget: T=2k predicted")


# ----------------------------------------------------------------------------- the pipeline
@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One CPU run of the whole benchmark: tiny model, sdpa and lightning, T = 64 and 128,
    3 steps (the first is warm-up), the HF anchor when transformers is installed."""
    tmp = tmp_path_factory.mktemp("bench_train")
    env = dict(os.environ, LONGCTX_CACHE=str(tmp / "cache"), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)  # conftest's setting for in-process kernels only
    env.pop("OUT", None)
    cmd = [sys.executable, str(BENCH / "bench_train.py"), "--device", "cpu",
           "--models", "tiny", "--families", "sdpa,lightning", "--seqlens", "64,128",
           "--tokens", "128", "--micro-tokens", "64", "--steps", "3", "--warmup", "1",
           "--max-bytes", "100000", "--run-timeout", "240", "--out", str(tmp / "out"),
           "--work-dir", str(tmp / "runs")]
    r = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads((tmp / "out" / "bench_train.json").read_text())
    return dict(stdout=r.stdout, data=data, md=(tmp / "out" / "bench_train.md").read_text(),
                out=tmp / "out")


@pytest.mark.slow
def test_cpu_pipeline_rows_and_markdown(smoke):
    rows, meta = smoke["data"]["rows"], smoke["data"]["meta"]
    ours = [r for r in rows if r["impl"] == "ours"]
    assert sorted((r["family"], r["T"]) for r in ours) == [
        ("lightning", 64), ("lightning", 128), ("sdpa", 64), ("sdpa", 128)]
    for r in ours:
        assert r["status"] == "ok", r
        assert r["tokens_per_s"] > 0 and r["peak_mem_gb"] > 0 and r["steps_done"] == 3
        assert r["steady_steps"] == 2 and r["doc_mask"] is False and r["compile"] is False
    # 128 tokens per step at T=64 is 2 rows, micro-batches of 64 tokens: accumulation of 2
    r64 = next(r for r in ours if r["T"] == 64)
    assert (r64["global_batch"], r64["micro_batch"], r64["grad_accum"]) == (2, 1, 2)
    assert meta["settings"]["device"] == "cpu" and meta["torch"] and meta["date"]
    assert "document_mask=false" in meta["doc_note"]
    md = smoke["md"]
    assert "| family | T=64 | T=128 |" in md and "| sdpa |" in md and "| lightning |" in md
    assert md.strip() in smoke["stdout"]  # the table is printed last
    png = (smoke["out"] / "bench_train.png").exists()
    assert png == (importlib.util.find_spec("matplotlib") is not None) or "matplotlib" in md
    # --replot rebuilds the Markdown from the JSON alone
    again = subprocess.run([sys.executable, str(BENCH / "bench_train.py"), "--replot",
                            str(smoke["out"] / "bench_train.json"), "--out",
                            str(smoke["out"] / "replot")], capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0 and (smoke["out"] / "replot" / "bench_train.md").read_text() == md


@pytest.mark.slow
def test_cpu_pipeline_hf_anchor(smoke):
    hf = [r for r in smoke["data"]["rows"] if r["impl"] == "hf"]
    assert sorted(r["T"] for r in hf) == [64, 128]
    if not HAS_TRANSFORMERS:
        assert all(r["status"] == "skipped" and "transformers" in r["reason"] for r in hf)
        pytest.skip("transformers is not installed: the anchor rows are recorded as skipped")
    for r in hf:
        assert r["status"] == "ok", r
        assert r["tokens_per_s"] > 0
        a = r["anchor"]  # same shape as ours: the parameter counts agree
        assert a["params_hf"] == a["params_ours"] and a["vocab_size"] == 320
        assert a["attn_implementation"] == "sdpa"
    ours = [r for r in smoke["data"]["rows"] if r["impl"] == "ours"]
    assert all(r["ratio_to_hf"] > 0 for r in ours)
    assert "HF Llama (sdpa)" in smoke["md"] and "×" in smoke["md"]


def test_hf_rows_are_skipped_with_a_reason_without_transformers(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(bt.importlib.util, "find_spec",
                        lambda name, *a: None if name == "transformers" else real(name, *a))
    a = bt.parse_args(["--device", "cpu", "--models", "tiny", "--seqlens", "64",
                       "--work-dir", str(tmp_path)])
    spec = next(s for s in tp.plan_sweep(a) if s["impl"] == "hf")
    row = bt.Runner(a).run(spec)
    assert row["status"] == "skipped" and "pip install transformers" in row["reason"]
    assert not any(tmp_path.iterdir())  # nothing was started
