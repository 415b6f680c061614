"""Does a checkpoint use its context? `python eval.py run=outputs/<run>` (or `ckpt=<step folder>`).

On one GPU or the CPU, with the model's own attention family, from a checkpoint of any format
and engine (parallel/export.py reads it):
- position loss: validation loss by position bucket, at the training length T and beyond it
  (2T where model.max_seq_len allows): does the loss keep falling with position?
- passkey: accuracy of retrieving a 5-digit key hidden in corpus text, by context length ×
  needle depth (exact match of all digits, greedy: each digit is the argmax given the right
  earlier ones, which is what greedy decoding produces when it is right);
- MQAR: multi-query associative recall accuracy by number of key-value pairs × length.
Writes <out>/eval.json, passkey.png and mqar.png (out: <run>/eval), prints the tables. The
model, attention and data settings come from the checkpoint; a `model.*`, `attn.*` or `data.*`
override that differs from them is refused, naming each key (eval the model that was trained).
"""
from __future__ import annotations

import json
import math
import os
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

import train
from data.synthetic import MQAR, Passkey, _row_rng
from models import Transformer
from models.loss import IGNORE_INDEX
from parallel.checkpoint import CheckpointError
from parallel.export import find_checkpoint, model_state
from parallel.run_folder import config_changes

CHECKED = ("model", "attn", "data")  # override groups compared with the checkpoint's config


def requested_changes(saved: dict, composed: DictConfig, overrides: list[str]) -> list[str]:
    """'key: trained -> requested' for each model/attn/data override that differs from the
    checkpoint's config."""
    requested = json.loads(json.dumps(saved, default=str))
    for item in overrides:
        key = item.lstrip("+~").split("=", 1)[0]
        if key.split(".")[0] not in CHECKED:
            continue
        value = OmegaConf.select(composed, key)
        value = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        node, *path = key.split(".")
        target = requested.setdefault(node, {})
        if not path:
            requested[node] = value
            continue
        for part in path[:-1]:
            target = target.setdefault(part, {})
        target[path[-1]] = value
    return [c for c in config_changes(saved, requested) if c.split(":")[0].split(".")[0] in CHECKED]


def load_model(folder: Path, device: torch.device) -> tuple[Transformer, dict, DictConfig]:
    """(model in eval mode on `device`, meta.json, the run's config) of a checkpoint folder."""
    state, meta = model_state(folder)
    saved = meta.get("config")
    if not saved:
        raise CheckpointError(f"checkpoint {folder} has no config in meta.json (written before "
                              "configs were saved); cannot rebuild its model")
    cfg = OmegaConf.create(saved)
    vocab = state["embed.weight"].shape[0]
    model = Transformer(train.build_model_config(cfg, vocab))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {folder} does not match its config's model: missing "
                              f"{missing[:3]}, unexpected {unexpected[:3]}")
    return model.to(device).eval(), meta, cfg


def token_losses(model: Transformer, ids: torch.Tensor, positions: torch.Tensor,
                 labels: torch.Tensor, cu_seqlens=None, chunk: int = 4096) -> torch.Tensor:
    """Per-token cross-entropy [N] (IGNORE labels give 0), logits a chunk at a time."""
    h = model.hidden_states(ids, positions, cu_seqlens).flatten(0, 1)
    y = labels.flatten()
    out = []
    for s in range(0, h.shape[0], chunk):
        logits = (h[s:s + chunk] @ model.output_weight.t()).float()
        out.append(torch.nn.functional.cross_entropy(logits, y[s:s + chunk], reduction="none",
                                                     ignore_index=IGNORE_INDEX))
    return torch.cat(out)


def argmax_at(model: Transformer, ids: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Greedy next-token predictions at the positions `where` [B, K] of rows `ids` [B, T]."""
    B, T = ids.shape
    positions = torch.arange(T, device=ids.device).expand(B, T)
    h = model.hidden_states(ids, positions)
    picked = h.gather(1, where[..., None].expand(-1, -1, h.shape[-1]))
    return (picked @ model.output_weight.t()).argmax(-1)


def visible_context(shape, cu_seqlens) -> np.ndarray:
    """int64 [B*T]: how many tokens each token attends to before itself, i.e. its offset in its
    attention segment (the row, or the document piece inside the row under document masks).

    This, not the RoPE position, is the x-axis of the position loss: a row that continues a
    document carries positions beyond the row length, yet sees only the row."""
    B, T = shape
    if cu_seqlens is None:
        return np.tile(np.arange(T, dtype=np.int64), B)
    bounds = cu_seqlens.numpy().astype(np.int64)
    lengths = np.diff(bounds)
    return np.arange(B * T, dtype=np.int64) - np.repeat(bounds[:-1], lengths)


def position_loss(model, cfg, lengths, buckets: int, rows: int, device, autocast) -> dict:
    """Validation loss by bucket of visible context at each length (rows of the run's
    validation split; synthetic-task runs use the builtin corpus)."""
    from data import build_data
    data_cfg = cfg.data if cfg.data.source in ("builtin", "hf") else OmegaConf.create(
        {"source": "builtin", "tokenizer": cfg.data.get("tokenizer", "bytes"),
         "cache_dir": cfg.data.get("cache_dir")})
    out = {}
    for T in lengths:
        _, _, val = build_data(OmegaConf.merge(data_cfg, {"val_batches": rows}), seq_len=T,
                               micro_batch=1, grad_accum=1)
        edges = np.linspace(0, T, buckets + 1).astype(int)
        sums, counts = np.zeros(buckets), np.zeros(buckets)
        for mb in val:
            with torch.no_grad(), autocast():
                loss = token_losses(model, mb["input_ids"].to(device), mb["positions"].to(device),
                                    mb["labels"].to(device), None if mb["cu_seqlens"] is None
                                    else mb["cu_seqlens"].to(device)).double().cpu().numpy()
            ctx = visible_context(mb["input_ids"].shape, mb["cu_seqlens"])
            ok = mb["labels"].flatten().numpy() != IGNORE_INDEX
            which = np.searchsorted(edges, ctx, side="right") - 1
            np.add.at(sums, which[ok], loss[ok])
            np.add.at(counts, which[ok], 1)
        out[str(T)] = {"axis": "visible context", "edges": edges.tolist(),
                       "tokens": counts.astype(int).tolist(),
                       "loss": [float(s / c) if c else None for s, c in zip(sums, counts)]}
    return out


def passkey(model, task: Passkey, lengths, depths, samples: int, seed: int, device, autocast) -> dict:
    acc = []
    for T in lengths:
        row = []
        for d, depth in enumerate(depths):
            cases = [task.sample(_row_rng(seed, T, d * 1000 + i), T, depth) for i in range(samples)]
            ids = torch.from_numpy(np.stack([c[0] for c in cases])).to(device)
            where = torch.from_numpy(np.stack([c[2] for c in cases])).to(device)
            want = torch.from_numpy(np.stack([c[1][c[2]] for c in cases])).to(device)
            with torch.no_grad(), autocast():
                got = argmax_at(model, ids, where)
            row.append(float((got == want).all(-1).float().mean()))
        acc.append(row)
    return {"lengths": list(lengths), "depths": list(depths), "samples": samples, "accuracy": acc}


def mqar(model, task: MQAR, pairs, lengths, samples: int, seed: int, device, autocast) -> dict:
    acc = []
    for n in pairs:
        row = []
        for T in lengths:
            if T < 2 * n + 2:
                row.append(None)
                continue
            cases = [task.sample(_row_rng(seed, T, n * 1000 + i), T, n) for i in range(samples)]
            labels = np.stack([c[1] for c in cases])
            where = torch.from_numpy(np.stack([np.flatnonzero(l != IGNORE_INDEX) for l in labels]))
            ids = torch.from_numpy(np.stack([c[0] for c in cases])).to(device)
            want = torch.from_numpy(np.take_along_axis(labels, where.numpy(), 1)).to(device)
            with torch.no_grad(), autocast():
                got = argmax_at(model, ids, where.to(device))
            row.append(float((got == want).float().mean()))
        acc.append(row)
    return {"pairs": list(pairs), "lengths": list(lengths), "samples": samples,
            "chance": [1.0 / n for n in pairs], "accuracy": acc}


def heatmap(path: Path, grid, rows, cols, row_label: str, col_label: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    data = np.array([[np.nan if v is None else v for v in r] for r in grid], dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(cols), 1.0 + 0.6 * len(rows)))
    im = ax.imshow(data, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), [str(c) for c in cols])
    ax.set_yticks(range(len(rows)), [str(r) for r in rows])
    ax.set_xlabel(col_label)
    ax.set_ylabel(row_label)
    ax.set_title(title, fontsize=9)
    for i, r in enumerate(data):
        for j, v in enumerate(r):
            if not math.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center",
                        color="white" if v < 0.6 else "black", fontsize=8)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _lengths(given, defaults, limit: int) -> list[int]:
    values = list(given) if given else defaults
    bad = [v for v in values if not isinstance(v, int) or v < 1]
    if bad:
        raise train.ConfigError(f"eval lengths {bad} must be positive integers")
    return sorted({v for v in values if v <= limit})


def evaluate(cfg: DictConfig, overrides: list[str] = ()) -> dict:
    """Run the evaluations `cfg.eval` asks for on `cfg.run` / `cfg.ckpt`; returns eval.json."""
    if not (cfg.get("run") or cfg.get("ckpt")):
        raise train.ConfigError("eval needs run=<run folder> or ckpt=<step folder>")
    where = Path(cfg.ckpt or cfg.run)
    if not where.exists():
        raise CheckpointError(f"{'ckpt' if cfg.ckpt else 'run'}={where}: no such folder")
    folder = find_checkpoint(where)
    device = train.resolve_device(cfg.device)
    model, meta, run_cfg = load_model(folder, device)
    changes = requested_changes(OmegaConf.to_container(run_cfg, resolve=True), cfg, overrides)
    if changes:
        raise train.ConfigError(f"checkpoint {folder} was trained with other settings; "
                                f"requested: {'; '.join(changes)}. Drop these overrides (eval "
                                "uses the checkpoint's model, attention and data)")
    amp = train.resolve_dtype(cfg.dtype, device)
    autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp else nullcontext
    e, T, limit = cfg.eval, run_cfg.trainer.seq_len, run_cfg.model.max_seq_len
    result = {"checkpoint": str(folder), "step": meta["step"], "attn": run_cfg.attn.name,
              "layer_pattern": OmegaConf.to_container(run_cfg.model.layer_pattern)
              if run_cfg.model.get("layer_pattern") else None, "seq_len": T}
    from data import build_tokenizer, synthetic_task
    tokenizer = build_tokenizer(str(run_cfg.data.get("tokenizer", "bytes")))
    if e.position_loss:
        result["position_loss"] = position_loss(
            model, run_cfg, _lengths(e.lengths, [T, 2 * T], limit), int(e.buckets),
            int(e.val_rows), device, autocast)
    if e.passkey:
        hay = OmegaConf.merge({"source": "passkey", "cache_dir": run_cfg.data.get("cache_dir")},
                              {"max_bytes": int(e.haystack_bytes)})
        lengths = _lengths(e.passkey_lengths, [T // 4, T // 2, T, 2 * T], limit)
        task = synthetic_task(hay, tokenizer, min(lengths))
        result["passkey"] = passkey(model, task, lengths, list(e.depths), int(e.samples),
                                    int(e.seed), device, autocast)
    if e.mqar:
        d = run_cfg.data
        trained = d.source in ("mqar", "recall")  # evaluate on the keys and values it learned
        shape = {k: int(d[k]) for k in ("n_keys", "n_values")} if trained else {}
        pairs = list(e.mqar_pairs)
        task = MQAR(n_pairs=max(pairs), **shape)
        try:
            task.check(tokenizer.vocab_size, 2 * task.n_pairs + 2)
        except ValueError as err:
            raise train.ConfigError(f"eval.mqar_pairs={pairs}: {err}") from err
        lengths = _lengths(e.mqar_lengths, [T // 4, T // 2, T, 2 * T], limit)
        result["mqar"] = mqar(model, task, pairs, lengths, int(e.samples),
                              int(e.seed), device, autocast)
    return result


def write(result: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=1))
    written = [out / "eval.json"]
    name = result["attn"] if not result.get("layer_pattern") else "+".join(
        dict.fromkeys(result["layer_pattern"]))
    if "passkey" in result:
        p = result["passkey"]
        heatmap(out / "passkey.png", [list(r) for r in zip(*p["accuracy"])], p["depths"],
                p["lengths"], "needle depth", "context length",
                f"passkey accuracy, {name}, step {result['step']}")
        written.append(out / "passkey.png")
    if "mqar" in result:
        m = result["mqar"]
        heatmap(out / "mqar.png", m["accuracy"], m["pairs"], m["lengths"], "key-value pairs",
                "sequence length", f"MQAR accuracy, {name}, step {result['step']}")
        written.append(out / "mqar.png")
    return written


def report(result: dict) -> str:
    lines = [f"checkpoint {result['checkpoint']} (step {result['step']}, attn {result['attn']})"]
    for T, r in result.get("position_loss", {}).items():
        losses = " ".join("-" if v is None else f"{v:.3f}" for v in r["loss"])
        lines.append(f"loss by visible context bucket, T={T}: {losses}")
    if "passkey" in result:
        p = result["passkey"]
        lines.append("passkey accuracy (rows: length; columns: depth " +
                     " ".join(f"{d:g}" for d in p["depths"]) + ")")
        lines += [f"  {T:>7}: " + " ".join(f"{v:.2f}" for v in row)
                  for T, row in zip(p["lengths"], p["accuracy"])]
    if "mqar" in result:
        m = result["mqar"]
        lines.append("MQAR accuracy (rows: pairs; columns: length " +
                     " ".join(str(t) for t in m["lengths"]) + ")")
        lines += [f"  {n:>7}: " + " ".join("-" if v is None else f"{v:.2f}" for v in row)
                  for n, row in zip(m["pairs"], m["accuracy"])]
    return "\n".join(lines)


def log_to_wandb(run_folder: Path, run_cfg: dict, result: dict, files: list[Path]) -> bool:
    """Add the results to the run's own W&B run (its id is in the run folder; the run's
    logger settings, offline by default): accuracies as numbers and tables, the heat maps as
    images. False when the run has no W&B run or wandb is not installed."""
    id_file = run_folder / "wandb_id.txt"
    if not id_file.exists():
        return False
    try:
        import wandb
    except ImportError:
        return False
    logger = run_cfg.get("logger") or {}
    run = wandb.init(project=logger.get("project", "longctx"), entity=logger.get("entity"),
                     mode=logger.get("mode", "offline"), dir=str(run_folder),
                     id=id_file.read_text().strip(), resume="allow")
    data = {f"eval/{f.stem}": wandb.Image(str(f)) for f in files if f.suffix == ".png"}
    for task, (rows, cols) in {"passkey": ("lengths", "depths"), "mqar": ("pairs", "lengths")}.items():
        if task in result:
            r = result[task]
            cells = [v for row in r["accuracy"] for v in row if v is not None]
            data[f"eval/{task}_acc"] = sum(cells) / len(cells) if cells else None
            data[f"eval/{task}"] = wandb.Table(columns=[rows, *map(str, r[cols])],
                                               data=[[x, *row] for x, row in zip(r[rows], r["accuracy"])])
    run.log(data, step=result["step"])
    run.finish()
    return True


def main(cfg: DictConfig, overrides: list[str]) -> dict:
    result = evaluate(cfg, overrides)
    folder = Path(result["checkpoint"])
    run_folder = Path(cfg.run) if cfg.get("run") else folder.parent.parent
    out = Path(cfg.out) if cfg.get("out") else run_folder / "eval"
    files = write(result, out)
    print(report(result))
    print(f"wrote {out}/eval.json")
    if cfg.get("wandb", "auto") == "auto" and log_to_wandb(
            run_folder, json.loads((folder / "meta.json").read_text()).get("config") or {},
            result, files):
        print(f"logged to the run's W&B run ({run_folder / 'wandb'})")
    return result


def _hydra_main():
    import hydra
    from hydra.core.hydra_config import HydraConfig

    @hydra.main(config_path="configs", config_name="eval", version_base="1.3")
    def run(cfg: DictConfig) -> None:
        try:
            main(cfg, list(HydraConfig.get().overrides.task))
        except (ValueError, OSError) as err:  # config, checkpoint, input
            if os.environ.get("LONGCTX_TRACEBACK"):
                raise
            sys.exit(f"error: {err}")

    run()


if __name__ == "__main__":
    _hydra_main()
