"""One table of many training runs: summary.md, summary.csv and summary.png.

    python scripts/summarize.py multirun/<date> [more folders ...] [--out DIR]

Every folder holding a `metrics.jsonl` below the given folders is a run (Hydra multirun puts them
in `multirun/<date>/<num>-<swept overrides>/`). Per run it reads `.hydra/overrides.yaml` (the
run's name: the overrides whose values differ between the runs; and one column per such key),
`summary.json` (written by train.py at the end of a run; status "done"), else `metrics.jsonl` (status
"incomplete": last step, last val_loss, median tokens/s over the log rows after the first, last
peak memory and MFU), and `eval/eval.json` (passkey and MQAR accuracy, loss of the last position
bucket). Anything missing is an empty cell. Rows are sorted by final validation loss (missing
last); the Markdown table is printed too. --out defaults to the first folder.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from pathlib import Path

import yaml

COLUMNS = ["run", "status", "attn", "model", "seq_len", "steps", "final_val_loss",
           "final_train_loss", "tokens_per_s", "mfu", "peak_mem_gb", "passkey_acc", "mqar_acc",
           "loss_last_bucket"]
ALIASES = {"trainer.seq_len": "seq_len"}  # override key -> the fixed column it sets
LOSSES = {"final_val_loss", "final_train_loss", "loss_last_bucket"}


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_yaml(path: Path):
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def read_metrics(path: Path) -> list[dict]:
    rows = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return rows
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:  # a run still writing may leave a half line at the end
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def last(rows: list[dict], key: str):
    values = [r[key] for r in rows if r.get(key) is not None]
    return values[-1] if values else None


def from_metrics(rows: list[dict]) -> dict:
    logs = [r for r in rows if "loss" in r]
    # the first log window holds compilation and autotuning: not the steady speed
    speeds = [r["tokens_per_s"] for r in (logs[1:] or logs) if r.get("tokens_per_s") is not None]
    return {"steps": last(rows, "step"), "final_val_loss": last(rows, "val_loss"),
            "final_train_loss": last(logs, "loss"),
            "tokens_per_s": statistics.median(speeds) if speeds else None,
            "mfu": last(logs, "mfu"), "peak_mem_gb": last(logs, "peak_mem_gb")}


def from_config(cfg) -> dict:
    """attn, model and seq_len of a run without summary.json, from Hydra's composed config."""
    if not isinstance(cfg, dict):
        return {}
    model, attn, trainer = (cfg.get(k) if isinstance(cfg.get(k), dict) else {}
                            for k in ("model", "attn", "trainer"))
    pattern = model.get("layer_pattern")
    name = ("+".join(dict.fromkeys(map(str, pattern))) if isinstance(pattern, list) and pattern
            else attn.get("name"))
    out = {"attn": name, "model": model.get("name"), "seq_len": trainer.get("seq_len")}
    # Hydra saves the config unresolved: an interpolation is not a value
    return {k: v for k, v in out.items() if v is not None and "${" not in str(v)}


def grid_mean(grid):
    flat, stack = [], [grid]
    while stack:
        x = stack.pop()
        if isinstance(x, list):
            stack.extend(x)
        elif isinstance(x, (int, float)) and not isinstance(x, bool):
            flat.append(float(x))
    return sum(flat) / len(flat) if flat else None


def from_eval(ev: dict) -> dict:
    part = lambda k: ev.get(k) if isinstance(ev.get(k), dict) else {}  # noqa: E731
    losses = part("position_loss").get("loss")
    return {"passkey_acc": grid_mean(part("passkey").get("accuracy")),
            "mqar_acc": grid_mean(part("mqar").get("accuracy")),
            "loss_last_bucket": losses[-1] if isinstance(losses, list) and losses else None}


def parse_overrides(raw) -> dict[str, str]:
    out = {}
    for item in raw if isinstance(raw, list) else []:
        key, sep, value = str(item).partition("=")
        if sep:
            out[key.lstrip("+~")] = value
    return out


def read_run(folder: Path) -> dict:
    raw = read_yaml(folder / ".hydra" / "overrides.yaml")
    summary = read_json(folder / "summary.json")
    row = {"run": ",".join(map(str, raw)) if isinstance(raw, list) and raw else folder.name,
           "status": "done" if summary else "incomplete"}
    row.update(from_config(read_yaml(folder / ".hydra" / "config.yaml")))
    # summary.json wins; metrics.jsonl fills what it lacks (its keys may be null)
    for source in (from_metrics(read_metrics(folder / "metrics.jsonl")), summary):
        row.update({k: v for k, v in source.items() if k in COLUMNS and v is not None})
    row.update({k: v for k, v in from_eval(read_json(folder / "eval" / "eval.json")).items()
                if v is not None})
    row["overrides"] = parse_overrides(raw)
    return row


def find_runs(folder: Path) -> list[Path]:
    return sorted({p.parent for p in folder.rglob("metrics.jsonl") if p.is_file()})


def number(v):
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) \
        else None


def sort_key(row: dict):
    v = number(row.get("final_val_loss"))
    return (v is None, v if v is not None else 0.0, row["run"])


def fmt(col: str, v) -> str:
    if v is None:
        return ""
    x = number(v)
    if x is None or isinstance(v, str):
        return str(v).replace("|", "\\|")  # a pipe would split the Markdown cell
    if col in LOSSES:
        return f"{x:.4g}"
    if col == "tokens_per_s":
        return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"
    if col == "mfu":
        return f"{100 * x:.1f}%"
    if col in ("passkey_acc", "mqar_acc"):
        return f"{x:.3f}"
    if col == "peak_mem_gb":
        return f"{x:.2f}"
    return f"{x:g}" if isinstance(x, float) else str(x)


def table(rows: list[dict], columns: list[str]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |",
             "|" + "|".join("---" if c in ("run", "status", "attn", "model")
                            or c not in COLUMNS else "---:" for c in columns) + "|"]
    return lines + ["| " + " | ".join(fmt(c, r.get(c)) for c in columns) + " |" for r in rows]


def plot(path: Path, rows: list[dict]) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"{path.name} skipped: matplotlib is not installed (pip install matplotlib)"
    names = [r["run"] for r in rows]
    # horizontal bars: run names are override lists, too long for an x axis
    fig, axes = plt.subplots(1, 2, figsize=(12, 1.5 + 0.35 * len(rows)), sharey=True)
    for ax, col, label in zip(axes, ("final_val_loss", "tokens_per_s"),
                              ("final validation loss", "tokens/s")):
        values = [number(r.get(col)) for r in rows]
        ax.barh(range(len(rows)), [math.nan if v is None else v for v in values])
        known = [v for v in values if v is not None]
        if col == "final_val_loss" and known and min(known) > 0:
            ax.set_xlim(left=0.95 * min(known))  # losses of a sweep differ in the 2nd digit
        ax.set_xlabel(label)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(rows)), names, fontsize=8)
    axes[0].invert_yaxis()  # table order, best first at the top (shared by both panels)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folders", nargs="+", type=Path, help="multirun/<date> or any folder of runs")
    ap.add_argument("--out", type=Path, help="where summary.{md,csv,png} go (default: the first "
                    "folder)")
    args = ap.parse_args(argv)
    runs = []
    for folder in args.folders:
        found = find_runs(folder)
        if not found and len(args.folders) > 1:
            print(f"note: no run folders (metrics.jsonl) under {folder}", file=sys.stderr)
        runs += [r for r in found if r not in runs]
    if not runs:
        print("error: no run folders (metrics.jsonl) under "
              + ", ".join(map(str, args.folders)), file=sys.stderr)
        return 1
    rows = sorted((read_run(r) for r in runs), key=sort_key)
    keys = list(dict.fromkeys(k for r in rows for k in r["overrides"]))
    # an override of a fixed column (attn=) shows in that column, not twice, and fills it for a
    # run that did not get as far as writing it
    for r in rows:
        for k, v in r["overrides"].items():
            col = ALIASES.get(k, k)
            if col in COLUMNS and r.get(col) is None:
                r[col] = v
    swept = [k for k in keys if len({r["overrides"].get(k) for r in rows}) > 1]
    varying = [k for k in swept if k not in COLUMNS]
    for r in rows:
        r.update({k: r["overrides"].get(k) for k in varying})
        # a run is named by what differs between the runs (the sweep's axes), not by the
        # overrides they share
        named = [f"{k}={r['overrides'][k]}" for k in swept if k in r["overrides"]]
        if named and len(rows) > 1:
            r["run"] = ",".join(named)
    columns = COLUMNS + varying
    md = "\n".join(table(rows, columns)) + "\n"
    out = args.out or args.folders[0]
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(
        f"# {len(rows)} runs under {', '.join(map(str, args.folders))}\n\n" + md)
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        w.writerows([["" if r.get(c) is None else r[c] for c in columns] for r in rows])
    note = plot(out / "summary.png", rows)
    if note:
        print(note, file=sys.stderr)
    print(md, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
