"""scripts/bench/harness.py (the benchmarks' shared report writer and guards), every script's
command line after the move into scripts/bench, scripts/tune and scripts/launch, and the
argument checks of scripts/gpu_session.sh; all on CPU."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts" / "bench"))

import harness  # noqa: E402

SCRIPTS = sorted(p for d in ("bench", "tune", "launch")
                 for p in (ROOT / "scripts" / d).glob("*.py")
                 if p.name not in ("harness.py", "train_plan.py", "train_report.py",
                                   "layer_cases.py"))  # modules


def test_harness_finds_the_repository_root():
    assert harness.ROOT == ROOT and (harness.ROOT / "train.py").exists()
    assert str(ROOT) in sys.path


def test_md_table_right_aligns_the_value_columns():
    lines = harness.md_table("fwd", ["T=4k", "T=16k"],
                             [("flash", ["1.0", "2.0"]), ("sdpa", ["-", "3"])])
    assert lines == ["| fwd | T=4k | T=16k |", "|---|---:|---:|", "| flash | 1.0 | 2.0 |",
                     "| sdpa | - | 3 |", ""]
    assert harness.seq_label(65536) == "T=64k" and harness.seq_label(256) == "T=256"


def test_write_report_writes_json_and_markdown(tmp_path, capsys):
    md = harness.write_report(tmp_path / "out", "bench_x",
                              dict(meta={"a": 1}, results=[{"T": 2}]), "| t |\n", quiet=False)
    assert json.loads((tmp_path / "out" / "bench_x.json").read_text()) == dict(
        meta={"a": 1}, results=[{"T": 2}])
    assert (tmp_path / "out" / "bench_x.md").read_text() == md == "| t |\n"
    assert "| t |" in capsys.readouterr().out


def test_run_guarded_records_why_a_backend_was_skipped():
    skipped = {}

    def missing():
        raise ImportError("no module named fla")

    def broken():
        raise RuntimeError("out of memory")
    assert harness.run_guarded(skipped, "fla", "T=4096", missing) is None
    assert harness.run_guarded(skipped, "flash", "T=4096", broken) is None
    assert harness.run_guarded(skipped, "flash", "T=8192", lambda: 3) == 3
    assert skipped == {"fla": "ImportError: no module named fla",
                       "flash@T=4096": "RuntimeError: out of memory"}
    # a backend that cannot be imported is not tried again at the next shape
    assert harness.run_guarded(skipped, "fla", "T=8192", lambda: 1 / 0) is None


def test_bench_moba_rounds_take_turns_and_report_medians(monkeypatch):
    """bench_moba.bench_rounds: every backend built once per T, timed once per round in turn,
    medians over the rounds (every round kept); a backend failing to build is skipped."""
    import bench_moba
    calls = []

    def make(name):
        def build(T, *shape):
            if name == "broken":
                raise RuntimeError("no kernel")
            calls.append(("build", name))
            return name, []
        return build

    times = {"a": iter([3.0, 1.0, 2.0]), "b": iter([5.0, 4.0, 6.0])}

    def timed(fn, inputs, warmup, rep):
        calls.append(("time", fn))
        t = next(times[fn])
        return dict(fwd_ms=t, fwdbwd_ms=2 * t, peak_mib=7.0)

    monkeypatch.setattr(bench_moba, "BACKENDS", {n: make(n) for n in ("a", "broken", "b")})
    monkeypatch.setattr(bench_moba, "time_fwd_bwd", timed)
    skipped = {}
    recs = bench_moba.bench_rounds(["a", "broken", "b"], 4096, (2, 2, 16, 64, 3), 3, 1, 1,
                                   skipped)
    assert calls == [("build", "a"), ("build", "b")] + [("time", "a"), ("time", "b")] * 3
    assert [(r["backend"], r["fwd_ms"], r["fwdbwd_ms"], len(r["rounds"])) for r in recs] == [
        ("a", 2.0, 4.0, 3), ("b", 5.0, 10.0, 3)]
    assert list(skipped) == ["broken@T=4096"]


def test_run_meta_names_card_versions_and_command():
    meta = harness.run_meta(device="cpu", H=16)
    assert meta["device"] == "cpu" and meta["H"] == 16 and meta["skipped"] == {}
    assert meta["torch"] and meta["triton"] and meta["date"] and meta["commit"]
    assert meta["command"].startswith("python3 ")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_script_prints_its_help(script):
    r = subprocess.run([sys.executable, str(script), "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "usage:" in r.stdout


def test_bench_attn_replots_a_result_file(tmp_path):
    meta = dict(device="H100", torch="2.11", triton="3.6", date="2026-11-27", tokens=32768, H=16,
                Hkv=16, D=128, dtype="bf16", skipped={"fla": "ImportError: x"})
    rows = [dict(backend=b, mode=m, T=4096, ms=1.0, tflops=400.0, tokens_per_s=3e7)
            for b in ("flash", "linear") for m in ("fwd", "fwdbwd")]
    src = tmp_path / "in.json"
    src.write_text(json.dumps(dict(meta=meta, results=rows)))
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench" / "bench_attn.py"),
                        "--replot", str(src), "--out", str(tmp_path / "out")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "out" / "bench_attn.md").read_text()
    assert "| flash | 400 (1.00) |" in md and "| linear | 30.00 |" in md  # linear: tokens/s only
    assert "Skipped: fla: ImportError: x" in md
    assert json.loads((tmp_path / "out" / "bench_attn.json").read_text())["results"] == rows


def test_gpu_session_checks_its_parts_before_setting_anything_up(tmp_path):
    script = ROOT / "scripts" / "gpu_session.sh"
    ok = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "bash scripts/gpu_session.sh env tests" in ok.stdout
    bad = subprocess.run(["bash", str(script), "env", "flahs"], capture_output=True, text=True,
                         timeout=60, env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "o")})
    assert bad.returncode == 2 and "unknown part 'flahs'" in bad.stderr
    assert not (tmp_path / "o").exists()  # refused before creating $OUT or installing wheels
