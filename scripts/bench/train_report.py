"""Reading and reporting of scripts/bench/bench_train.py's runs: steady-state numbers from a
run's metrics.jsonl, why a run failed, the run's metadata, and bench_train.{json,md,png}.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import re
import subprocess
from pathlib import Path

from harness import command_line, git_commit, md_table, package_version, write_report

HF = "hf"  # the anchor's family name in rows (and in --longest)
HF_LABEL = "HF Llama (sdpa)"
# environment variables that change what the kernels do: recorded in the meta
KERNEL_ENV = re.compile(r"^(FLASH_|LINEAR_|LIGHTNING_|NSA_|MOBA_|ATTN_|TRITON_|TORCHINDUCTOR_)")
STATUS_SHORT = {"oom": "OOM", "timeout": "timeout", "error": "error", "nonfinite": "non-finite",
                "skipped": "skipped", "data": "data"}


def fmt_size(t: int) -> str:
    if t >= 1 << 20 and t % (1 << 20) == 0:
        return f"{t >> 20}M"
    return f"{t // 1024}k" if t >= 1024 and t % 1024 == 0 else str(t)



# ----------------------------------------------------------------------------- reading
def read_metrics(path: Path, warmup: int) -> dict:
    """Steady-state numbers from a train.py-format metrics.jsonl.

    Each training line covers the steps since the previous one (its `step_time_s` is their
    mean). Windows that start at or after step `warmup` are the steady state; tokens/s there is
    tokens · steps / time over them, MFU scales with it (a fixed FLOPs-per-token factor)."""
    lines = path.read_text().splitlines() if path.exists() else []
    recs = [json.loads(x) for x in lines if x.strip()]
    train = [r for r in recs if "tokens_per_s" in r and "loss" in r]
    windows, prev = [], 0
    for r in train:
        windows.append(dict(start=prev, n=r["step"] - prev, **r))
        prev = r["step"]
    out = dict(steps_done=prev, losses=[w["loss"] for w in windows],
               loss_first=windows[0]["loss"] if windows else None,
               loss_last=windows[-1]["loss"] if windows else None,
               peak_mem_gb=max((w["peak_mem_gb"] for w in windows
                                if w.get("peak_mem_gb") is not None), default=None),
               tokens_per_s=None, mfu=None, step_time_s=None, steady_steps=0)
    steady = [w for w in windows if w["start"] >= warmup and w["n"] > 0]
    if steady:
        tokens_per_step = steady[0]["tokens_per_s"] * steady[0]["step_time_s"]
        n = sum(w["n"] for w in steady)
        t = sum(w["n"] * w["step_time_s"] for w in steady)
        out.update(tokens_per_s=tokens_per_step * n / t, step_time_s=t / n, steady_steps=n)
        w0 = steady[0]
        if w0.get("mfu") is not None and w0["tokens_per_s"]:
            out["mfu"] = w0["mfu"] / w0["tokens_per_s"] * out["tokens_per_s"]
    return out


def classify(res: dict, metrics: dict) -> tuple[str, str]:
    """(status, reason) of a finished subprocess: ok, oom, timeout, nonfinite, data, error."""
    log = res["log"]
    tail = [x for x in log.splitlines() if x.strip() and "HYDRA_FULL_ERROR" not in x]
    last = _telling_line(tail)
    if res["timed_out"]:
        return "timeout", f"killed after {res['wall_s']:.0f} s (at step {metrics['steps_done']})"
    if res["rc"] == 0:
        if metrics["steps_done"] == 0:
            return "error", "exit 0 but no training line in metrics.jsonl"
        return "ok", ""
    if "OutOfMemoryError" in log or "out of memory" in log.lower():
        oom = [x for x in tail if "out of memory" in x.lower() or "OutOfMemoryError" in x]
        return "oom", (oom[-1] if oom else last)[:300]
    if "error: non-finite " in log:
        return "nonfinite", last[:300]
    if "fewer than one global batch" in log or "corpus makes" in log:
        return "data", last[:300]
    if res["rc"] < 0:  # killed from outside (not by our timeout): the kernel's OOM killer, say
        return "error", (f"killed by signal {-res['rc']} (host out of memory?); last line: "
                         f"{last}")[:300]
    return "error", (last or f"exit code {res['rc']}")[:300]


def _telling_line(lines: list[str]) -> str:
    """The line that says what went wrong: train.py's `error: ...`, the last exception line of
    a traceback, Hydra's `Could not override ...`; else the last line."""
    for pattern in (r"^error: ", r"^[\w.]*(Error|Exception|Interrupt)\b.*", r"^Could not "):
        hits = [x.strip() for x in lines if re.match(pattern, x.strip())]
        if hits:
            return hits[-1]
    return lines[-1].strip() if lines else ""


def loss_falls(row: dict, min_steps: int) -> bool:
    losses = row.get("losses") or []
    return (row["status"] == "ok" and row.get("steps_done", 0) >= min_steps
            and all(isinstance(x, (int, float)) and math.isfinite(x) for x in losses)
            and len(losses) >= 2 and losses[-1] < losses[0])


# ----------------------------------------------------------------------------- reporting
def label(row: dict) -> str:
    name = HF_LABEL if row["family"] == HF else row["family"]
    if row.get("compile"):
        name += " +compile"
    if row["family"] != HF and row.get("doc_mask"):
        name += " +docmask"
    return name


def add_ratios(rows: list[dict]) -> None:
    """ratio_to_hf: tokens/s over the eager HF anchor's at the same model and T."""
    for r in rows:
        r.pop("ratio_to_hf", None)
        if r["kind"] != "sweep" or r["family"] == HF or not r.get("tokens_per_s"):
            continue
        hf = [h for h in rows if h["kind"] == "sweep" and h["family"] == HF
              and h["model"] == r["model"] and h["T"] == r["T"] and h.get("tokens_per_s")]
        hf.sort(key=lambda h: bool(h.get("compile")))  # the eager anchor first
        if hf:
            r["ratio_to_hf"] = r["tokens_per_s"] / hf[0]["tokens_per_s"]


def _k(x: float) -> str:
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"


def cell(r: dict | None) -> str:
    if r is None:
        return ""
    if r["status"] != "ok":
        return STATUS_SHORT.get(r["status"], r["status"])
    if not r.get("tokens_per_s"):
        return "no steady window"
    parts = [_k(r["tokens_per_s"])]
    parts.append(f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "–")
    parts.append(f"{r['peak_mem_gb']:.1f} GB" if r.get("peak_mem_gb") is not None else "–")
    if r.get("ratio_to_hf") is not None:
        parts.append(f"{r['ratio_to_hf']:.2f}×")
    return " · ".join(parts)


def markdown(meta: dict, rows: list[dict], longest: list[dict]) -> str:
    s = meta["settings"]
    lines = [f"# bench_train: {meta['card']}",
             "",
             f"torch {meta['torch']}, triton {meta['triton']}, transformers "
             f"{meta['transformers']}, {meta['date']}, commit {meta['commit']}; device "
             f"{s['device']}, dtype {s['dtype']}.",
             "",
             f"{s['tokens']} tokens per optimizer step (global_batch = tokens / T, at least one "
             f"row; micro_batch ≤ {s['micro_tokens']} tokens / T rows, gradient accumulation for "
             f"the rest); activation checkpointing from T ≥ {fmt_size(s['ac_from'])}; "
             f"{s['steps']} steps ({s['steps_long']} with checkpointing), the first "
             f"{s['warmup']} excluded (warm-up, compile); autotune "
             f"{'on' if s['autotune'] else 'off (tuned defaults)'}. "
             + meta["doc_note"],
             "",
             "Cell: tokens/s · MFU (6·N + attention FLOPs of our model, same count for HF) · "
             "peak GB · tokens/s over the eager HF anchor's at that T.",
             ""]
    sweep = [r for r in rows if r["kind"] == "sweep"]
    for model in dict.fromkeys(r["model"] for r in sweep):
        mr = [r for r in sweep if r["model"] == model]
        Ts = sorted({r["T"] for r in mr})
        table = [(lab, [cell(next((r for r in mr if label(r) == lab and r["T"] == t), None))
                        for t in Ts]) for lab in dict.fromkeys(label(r) for r in mr)]
        lines += [f"## {model}", ""] + md_table("family", [f"T={fmt_size(t)}" for t in Ts], table)
    if longest:
        lines += ["## Longest trainable T (micro_batch 1, activation checkpointing, "
                  f"≥ {s['longest_steps']} steps with finite, falling loss)", ""]
        table = []
        for x in longest:
            name = HF_LABEL if x["family"] == HF else x["family"]
            found = (fmt_size(x["longest_T"]) if x["longest_T"]
                     else f"none from {fmt_size(x['start'])}")
            tok = _k(x["tokens_per_s"]) if x.get("tokens_per_s") else "–"
            mem = f"{x['peak_mem_gb']:.1f}" if x.get("peak_mem_gb") is not None else "–"
            losses = " → ".join(f"{v:.3f}" for v in x["losses"]) if x.get("losses") else "–"
            table.append((x["model"], [name, found, tok, mem, losses, x["stopped_by"]]))
        lines += md_table("model", ["family", "longest T", "tokens/s there", "peak GB", "losses",
                                    "stopped by"], table)
    bad = [r for r in rows if r["status"] != "ok"]
    if bad:
        lines += ["Failed or skipped runs:", ""]
        for r in bad:
            lines.append(f"- {r['model']} {label(r)} T={fmt_size(r['T'])} ({r['kind']}): "
                         f"**{r['status']}** {r['reason']}")
        lines.append("")
    for note in meta.get("notes", []):
        lines.append(f"Note: {note}")
    return "\n".join(lines).rstrip() + "\n"


def plot(path: Path, meta: dict, rows: list[dict]) -> str | None:
    """tokens/s over T per family (log2 x), one panel per model; None, or why it was skipped."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "bench_train.png skipped: matplotlib is not installed (pip install matplotlib)"
    sweep = [r for r in rows if r["kind"] == "sweep"]
    models = list(dict.fromkeys(r["model"] for r in sweep))
    if not models:
        return "bench_train.png skipped: no sweep rows"
    fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 5), squeeze=False)
    for ax, model in zip(axes[0], models):
        mr = [r for r in sweep if r["model"] == model]
        for lab in dict.fromkeys(label(r) for r in mr):
            pts = sorted((r["T"], r["tokens_per_s"]) for r in mr
                         if label(r) == lab and r["status"] == "ok" and r.get("tokens_per_s"))
            if not pts:
                continue
            style = dict(color="black", linestyle="--") if lab.startswith(HF_LABEL) else {}
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=lab, **style)
        ax.set_xscale("log", base=2)
        Ts = sorted({r["T"] for r in mr})
        ax.set_xticks(Ts, [fmt_size(t) for t in Ts])
        ax.set_xlabel("sequence length T (tokens per step fixed)")
        ax.set_ylabel("tokens / s (one GPU: TGS)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.set_title(f"{model}, {meta['card']}", fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(f"train.py vs HF Llama, {meta['settings']['tokens']} tokens/step, "
                 f"torch {meta['torch']}, {meta['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write_outputs(out: Path, meta: dict, rows: list[dict], longest: list[dict],
                  png: bool = True) -> str:
    out.mkdir(parents=True, exist_ok=True)  # the PNG goes there before write_report runs
    add_ratios(rows)
    meta = dict(meta)
    if png:
        skipped = plot(out / "bench_train.png", meta, rows)
        meta["notes"] = [n for n in meta.get("notes", []) if "bench_train.png" not in n]
        if skipped:
            meta["notes"].append(skipped)
    return write_report(out, "bench_train", dict(meta=meta, rows=rows, longest=longest),
                        markdown(meta, rows, longest))


# ----------------------------------------------------------------------------- meta
def _card(device: str) -> str:
    if device == "cpu":
        return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    try:  # nvidia-smi, not torch: the parent must not hold a CUDA context while runs measure
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        first = q.stdout.strip().splitlines()[0] if q.returncode == 0 and q.stdout.strip() else ""
        if first:
            name, mem, driver = [x.strip() for x in first.split(",")]
            return f"{name} ({mem}, driver {driver})"
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    return "unknown GPU"


def build_meta(a, env: dict) -> dict:
    doc = a.doc_mask
    if doc == [False]:
        doc_note = ("Ours runs with data.document_mask=false, like HF (no mask at document "
                    "boundaries: the like-for-like comparison).")
    elif doc == [True]:
        doc_note = ("Ours masks attention at document boundaries (data.document_mask=true) and "
                    "HF does not: ours computes less attention; not like-for-like.")
    else:
        doc_note = ("Rows without +docmask run data.document_mask=false like HF (like-for-like); "
                    "+docmask rows mask documents, which HF does not.")
    return dict(
        card=_card(a.device), torch=package_version("torch"), triton=package_version("triton"),
        transformers=package_version("transformers"), python=platform.python_version(),
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        commit=git_commit(a.commit), command=command_line(), doc_note=doc_note, notes=[],
        env={k: v for k, v in env.items() if KERNEL_ENV.match(k)},
        settings=dict(models=a.models, families=[f for f, _ in a.families], seqlens=a.seqlens,
                      tokens=a.tokens, micro_tokens=a.micro_tokens, ac_from=a.ac_from,
                      steps=a.steps, steps_long=a.steps_long, warmup=a.warmup,
                      log_every=a.log_every, compile=a.compile, hf=a.hf, hf_compile=a.hf_compile,
                      doc_mask=a.doc_mask, device=a.device, dtype=a.dtype, seed=a.seed,
                      autotune=a.autotune, budget=a.budget, run_timeout=a.run_timeout,
                      override=a.override, longest=[f"{f}:{s}" if s else f for f, s in a.longest],
                      longest_start=a.longest_start, longest_max=a.longest_max,
                      longest_steps=a.longest_steps, longest_override=a.longest_override,
                      max_bytes=a.max_bytes))


