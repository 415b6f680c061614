"""What the benchmark scripts in scripts/bench/ share: the repository on sys.path, the run's
metadata, fault-tolerant backend runs, forward / forward+backward timing, and the report writer.

Every script writes <out>/<stem>.json ({"meta": ..., "results": ...}) and <out>/<stem>.md
through `write_report`, and its meta holds the card, versions, date, commit and the command
line, so a raw file copied to docs/bench/ says how to reproduce it.
"""
from __future__ import annotations

import datetime
import json
import os
import shlex
import subprocess
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # the scripts import the repository's packages (attn, models, ...)
    sys.path.insert(0, str(ROOT))


# ----------------------------------------------------------------------------- metadata
def package_version(pkg: str) -> str:
    from importlib import metadata
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "not installed"


def git_commit(given: str | None = None) -> str:
    """`given`, else HEAD's short hash (+dirty when tracked files differ from it)."""
    if given:
        return given
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return "unknown (no git here; pass --commit)"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git here; pass --commit)"


def command_line() -> str:
    """This process's command as it would be typed in the repository root."""
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    return shlex.join(["python3", str(shown), *sys.argv[1:]])


def run_meta(device: str | None = None, **fields) -> dict:
    """Card, torch / triton versions, date, commit and command of this run, plus `fields`;
    `skipped` collects the backends that could not run (see run_guarded)."""
    import torch
    import triton
    if device is None:
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return dict(device=device, torch=torch.__version__, triton=triton.__version__,
                date=datetime.date.today().isoformat(), commit=git_commit(),
                command=command_line(), skipped={}, **fields)


def require_cuda(script: str) -> None:
    import torch
    if not torch.cuda.is_available():
        sys.exit(f"{script} needs a CUDA GPU")


# ----------------------------------------------------------------------------- running
def run_guarded(skipped: dict, name: str, where: str, fn):
    """fn(), or None when it fails: one failing backend must not sink the table. A backend
    that cannot be imported is skipped for the rest of the run (recorded under `name`); any
    other failure (out of memory, a compile error) only for this shape (`name@where`), with its
    traceback printed."""
    import torch
    if name in skipped:
        return None
    try:
        return fn()
    except (ImportError, AttributeError) as e:
        skipped[name] = f"{type(e).__name__}: {e}"[:300]
        print(f"skip {name}: {e}", flush=True)
    except Exception as e:  # noqa: BLE001 (recorded in the report, the other backends go on)
        skipped[f"{name}@{where}"] = f"{type(e).__name__}: {e}"[:300]
        traceback.print_exc()
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return None


def time_fwd_bwd(fn, inputs: list, warmup: int, rep: int) -> dict:
    """Median ms of fn(*inputs) without autograd and of forward + backward (a fixed upstream
    gradient, the inputs' gradients reset between repeats), and the peak memory of one
    forward + backward above what was allocated before it, in MiB."""
    import torch
    from triton.testing import do_bench
    do = torch.randn_like(fn(*inputs))
    with torch.no_grad():
        fwd = do_bench(lambda: fn(*inputs), warmup=warmup, rep=rep, return_mode="median")

    def step():
        fn(*inputs).backward(do)
    fwdbwd = do_bench(step, warmup=warmup, rep=rep, grad_to_none=inputs, return_mode="median")
    for t in inputs:
        t.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    return dict(fwd_ms=fwd, fwdbwd_ms=fwdbwd, peak_mib=peak)


# ----------------------------------------------------------------------------- reporting
def seq_label(t: int) -> str:
    return f"T={t // 1024}k" if t >= 1024 else f"T={t}"


def md_table(corner: str, columns: list[str], rows: list[tuple[str, list[str]]]) -> list[str]:
    """Markdown lines of one table (label column left, the others right-aligned) and a blank."""
    lines = [f"| {corner} | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows]
    return lines + [""]


def skipped_line(meta: dict) -> list[str]:
    skipped = meta.get("skipped") or {}
    return ["Skipped: " + "; ".join(f"{k}: {v}" for k, v in skipped.items())] if skipped else []


def write_report(out_dir, stem: str, payload: dict, md: str, quiet: bool = True) -> str:
    """<out_dir>/<stem>.json (payload) and <out_dir>/<stem>.md; prints the Markdown unless
    quiet. Scripts call it after every measured row, so a run cut off by its time limit still
    leaves what it measured."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{stem}.json"), "w") as f:
        json.dump(payload, f, indent=1, default=str)
    with open(os.path.join(out_dir, f"{stem}.md"), "w") as f:
        f.write(md)
    if not quiet:
        print(md)
    return md
