"""What a run writes besides its checkpoints, all into its run folder (rank 0):

- `MetricsLog`: metrics.jsonl, console lines and one more sink (`wandb_run`: a W&B run,
  continued when a job resumes in the same folder, named and grouped by `run_labels`);
- `write_summary`: summary.json (scripts/summarize.py) and the sink's summary;
- `StepProfiler`: torch.profiler over a few steps (profile.txt, profile.json, a Chrome trace);
- the numbers the loop reports beside the loss: `peak_memory_gb`, `peak_flops` (for MFU).

Nothing here touches process groups: train.py passes is_main.
"""
from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf

# dense bf16 tensor-core peak per card, TFLOP/s (MFU's denominator; trainer.peak_tflops overrides)
KNOWN_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0}


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def peak_flops(cfg_value, device: torch.device) -> float | None:
    if cfg_value:
        return float(cfg_value) * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tf in KNOWN_PEAK_TFLOPS.items():
            if key in name:
                return tf * 1e12
    return None


class MetricsLog:
    """metrics.jsonl always (rank 0), console lines (`console`) and one more sink when
    `open_sink` is given: called once on rank 0, it returns an object with log(metrics, step=)
    and finish() (logger=wandb: wandb_run; train.open_metrics_log builds it from the logger
    group)."""

    def __init__(self, out_dir: Path, *, console: bool, open_sink: Callable[[], Any] | None,
                 is_main: bool):
        self.is_main, self.console, self.sink = is_main, console, None
        if not is_main:
            return
        self.file = open(out_dir / "metrics.jsonl", "a", buffering=1)
        if open_sink is not None:
            self.sink = open_sink()

    def log(self, metrics: dict, bar=None):
        if not self.is_main:
            return
        self.file.write(json.dumps(metrics) + "\n")
        if self.sink is not None:
            self.sink.log({k: v for k, v in metrics.items() if v is not None}, step=metrics["step"])
        if self.console:
            line = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in metrics.items() if v is not None)
            (bar.write if bar is not None else print)(line)

    def close(self):
        if self.is_main:
            self.file.close()
            if self.sink is not None:
                self.sink.finish()


class StepProfiler:
    """torch.profiler over `steps` optimizer steps after one warm-up step (trainer.profile_steps):
    writes profile.txt (ops by device time), profile.json (device time per kind of kernel) and a
    Chrome trace into the run folder. Kinds are read off kernel names: matmul (cuBLAS/CUTLASS
    GEMMs), attention (our Triton kernels and torch's attention), elementwise (inductor's fused
    triton_ kernels, torch's pointwise and reductions), copy (casts, memcpy), comm (NCCL)."""

    KINDS = (("comm", ("nccl",)),
             ("elementwise", ("triton_poi", "triton_per", "triton_red")),  # inductor's fusions
             ("copy", ("copy", "memcpy", "cast", "to_copy")),
             ("matmul", ("gemm", "cutlass", "xmma", "gemv", "matmul", "aten::mm", "addmm", "bmm",
                         "splitk", "nvjet")),
             ("attention", ("_fwd", "_bwd", "_dq", "_dkdv", "attn", "flash", "scan", "chunk_out",
                            "seg_state", "state_scan", "select", "slc", "cmp", "gate_mix",
                            "routed", "moba", "flex")),
             ("elementwise", ("triton_", "elementwise", "reduce", "norm", "silu", "mul", "add",
                              "softmax", "cross_entropy", "nll", "foreach", "adam")))

    def __init__(self, steps: int, out_dir: Path, device: torch.device):
        from torch.profiler import ProfilerActivity, profile, schedule
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        self.out_dir, self.cuda = out_dir, device.type == "cuda"
        self.prof = profile(activities=acts, schedule=schedule(wait=0, warmup=1, active=steps),
                            on_trace_ready=self._write)
        self.prof.start()
        self.left = steps + 1

    def step(self) -> None:
        if self.left > 0:
            self.prof.step()
            self.left -= 1
            if self.left == 0:
                self.prof.stop()

    def _write(self, prof) -> None:
        attr = "device_time_total" if self.cuda else "cpu_time_total"
        avg = prof.key_averages()
        (self.out_dir / "profile.txt").write_text(avg.table(sort_by=attr, row_limit=40))
        prof.export_chrome_trace(str(self.out_dir / "profile_trace.json"))
        kinds: dict = {}
        for ev in avg:
            # device kernels only: they have no host time of their own (operator rows would
            # count their kernels a second time; ProfilerStep* spans the whole step)
            self_dev = getattr(ev, "self_device_time_total", 0.0) if self.cuda else 0.0
            if self.cuda and (ev.self_cpu_time_total > 0 or self_dev <= 0
                              or ev.key.startswith("ProfilerStep")):
                continue
            name = ev.key.lower()
            kind = next((k for k, keys in self.KINDS if any(x in name for x in keys)), "other")
            ms = (self_dev if self.cuda else ev.self_cpu_time_total) / 1e3
            kinds[kind] = kinds.get(kind, 0.0) + ms
        total = sum(kinds.values()) or 1.0
        (self.out_dir / "profile.json").write_text(json.dumps(
            {"ms": kinds, "share": {k: v / total for k, v in kinds.items()}}, indent=1))


def _wandb_id(out_dir: Path) -> str:
    """One W&B run id per output folder, so a resumed job continues the same run."""
    f = out_dir / "wandb_id.txt"
    if not f.exists():
        f.write_text(os.urandom(6).hex())
    return f.read_text().strip()


def sweep_label(limit: int = 100) -> str:
    """A multirun job's name: its values of the keys the command line sweeps (`attn=moba,
    trainer.seq_len=8192` for `-m attn=flash,moba trainer.seq_len=2048,8192 model=350m`),
    all its overrides when the command line is not this process's (a remote launcher); longer
    than `limit` characters: cut, with a digest of the whole. configs/train.yaml names the
    sweep's sub-folders with it (`${sweep_label:}`)."""
    import hashlib

    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser
    task = list(HydraConfig.get().overrides.task)
    try:
        given = OverridesParser.create().parse_overrides(
            [a for a in sys.argv[1:] if "=" in a and not a.startswith("-")])
        swept = {o.key_or_group for o in given if o.is_sweep_override()}
    except Exception:  # noqa: BLE001  (not a Hydra command line: no sweep to read)
        swept = set()
    mine = [o for o in task if o.split("=", 1)[0].lstrip("+~") in swept] or task
    label = ",".join(mine).replace("/", "_")
    if len(label) > limit:
        label = label[:limit - 9] + "-" + hashlib.sha1(label.encode()).hexdigest()[:8]
    return label


def run_labels(run_cfg: DictConfig) -> tuple[str, str | None]:
    """(run name, group): under a Hydra multirun, the job's `sweep_label` and the sweep
    folder's name, so a sweep's runs read as one group; else run_name and no group."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            return sweep_label() or run_cfg.run_name, Path(HydraConfig.get().sweep.dir).name
    except ImportError:
        pass
    return run_cfg.run_name, None


def attn_label(model_cfg) -> str:
    """The attention of a run in a word: the family, or the families of a layer_pattern."""
    return "+".join(dict.fromkeys(model_cfg.layer_families()))


def wandb_run(out_dir: Path, run_cfg: DictConfig, *, project: str, entity: str | None, mode: str,
              tags: list):
    """logger=wandb's sink: a W&B run in the run folder, continued when a job resumes there;
    named and grouped by `run_labels`, tagged with the attention family."""
    import wandb
    name, group = run_labels(run_cfg)
    pattern = run_cfg.model.get("layer_pattern")
    family = "+".join(dict.fromkeys(pattern)) if pattern else run_cfg.attn.name
    return wandb.init(project=project, entity=entity, mode=mode, tags=[*tags, family],
                      name=name, group=group, dir=str(out_dir),
                      config=OmegaConf.to_container(run_cfg, resolve=True), resume="allow",
                      id=_wandb_id(out_dir))


def write_summary(out_dir: Path, log: "MetricsLog", summary: dict) -> None:
    """summary.json in the run folder (scripts/summarize.py reads it) and the W&B run's summary."""
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    sink_summary = getattr(log.sink, "summary", None)
    if sink_summary is not None:
        sink_summary.update({k: v for k, v in summary.items() if v is not None})
