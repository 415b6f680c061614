"""DeepSpeed ZeRO data parallelism: `parallel=deepspeed` (configs/parallel/deepspeed.yaml).

ZeRO stage 1 partitions the optimizer state over all ranks, stage 2 the gradients as well,
stage 3 the parameters too (gathered per module for forward and backward); stage 0 is
DeepSpeed's plain data parallelism. The run keeps the loop every engine shares (train.py),
through the `parallel.Parallelized` seam:

- forward runs through the DeepSpeed engine (its output hooks open each backward);
- accumulation: DeepSpeed's gradient_accumulation_steps is the loop's, `no_sync(last)` sets the
  engine's accumulation boundary explicitly (stage 0/1 reduce on the last micro-batch only;
  stages 2/3 reduce-scatter every micro-batch into the owned partition, as ZeRO does) and
  `backward` is `engine.backward(loss, scale_wrt_gas=False)`: the loop already scaled the loss
  by world / global token count, so DeepSpeed must not divide by the accumulation steps again.
  DeepSpeed averages gradients over every rank (dp and cp peers alike), as DDP does;
- step: one `engine.step()` per optimizer step. Stages 1-3 clip inside the ZeRO optimizer
  (DeepSpeed's gradient_clipping = trainer.grad_clip) and report the norm before clipping
  (`engine.get_global_grad_norm()`); a non-finite norm makes ZeRO skip the update (fp32 has no
  loss scaler) and the loop stops. Stage 0 clips with torch on the reduced, replicated gradients
  (DeepSpeed's clipping off) and steps only on a finite norm;
- lr: DeepSpeed gets no scheduler. Its ZeRO optimizer steps the loop's torch optimizer, whose
  param_groups (now holding flat fp32 partitions) the loop's scheduler keeps setting;
- precision: no fp16/bf16 section, so master weights, gradients and optimizer state stay fp32
  and torch autocast in the loop decides the compute dtype, as for the other engines;
- checkpoints: the same full state dicts as every engine (parallel/checkpoint.py), through
  DeepSpeed's full-state API (deepspeed.utils.safe_get_full_fp32_param /
  safe_get_full_optimizer_state, and their setters): every parameter and optimizer moment is
  gathered whole, keyed by parameter name; loading broadcasts rank 0's full tensors and each
  rank keeps its partition. A checkpoint moves between engines, ZeRO stages and world sizes.

One process runs plain (no DeepSpeed), as ddp and fsdp do; the settings are still checked.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from parallel import Parallelized
from parallel.dist import DistInfo, broadcast_object

ZERO_STAGES = (0, 1, 2, 3)
INSTALL = "parallel=deepspeed needs the deepspeed package: pip install deepspeed"
_GATHERED = "<per-parameter tensor>"  # marks a moment in the broadcast checkpoint skeleton


@dataclass(frozen=True)
class ZeroSettings:
    stage: int = 2
    reduce_bucket_size: int = 500_000_000
    overlap_comm: bool = False
    offload_optimizer: bool = False
    param_persistence_threshold: int = 100_000


def _copied(entries: dict) -> dict:
    """Optimizer state entries with tensors copied to CPU: a tensor shared by several parameters'
    states (AdamW's step) would be advanced once per parameter after loading."""
    return {k: v.detach().cpu().clone() if torch.is_tensor(v) else v for k, v in entries.items()}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# the keys of configs/parallel/deepspeed.yaml that read_settings reads
OPTIONS = ("zero_stage", "reduce_bucket_size", "overlap_comm", "offload_optimizer",
           "param_persistence_threshold")


def read_settings(cfg) -> ZeroSettings:
    """The parallel.* keys of configs/parallel/deepspeed.yaml, checked; one line per mistake."""
    stage = cfg.get("zero_stage", 2)
    if not _is_int(stage) or stage not in ZERO_STAGES:
        raise ValueError(f"parallel.zero_stage={stage!r} must be one of 0, 1, 2, 3")
    bucket = cfg.get("reduce_bucket_size", ZeroSettings.reduce_bucket_size)
    if not _is_int(bucket) or bucket <= 0:
        raise ValueError(f"parallel.reduce_bucket_size={bucket!r} must be a positive integer (elements)")
    whole = cfg.get("param_persistence_threshold", ZeroSettings.param_persistence_threshold)
    if not _is_int(whole) or whole < 0:
        raise ValueError(f"parallel.param_persistence_threshold={whole!r} must be a non-negative "
                         "integer (elements)")
    flags = {}
    for key in ("overlap_comm", "offload_optimizer"):
        flags[key] = cfg.get(key, False)
        if not isinstance(flags[key], bool):
            raise ValueError(f"parallel.{key}={flags[key]!r} must be true or false")
    if flags["offload_optimizer"] and stage == 0:
        raise ValueError("parallel.offload_optimizer=true needs parallel.zero_stage=1, 2 or 3")
    return ZeroSettings(stage, bucket, **flags, param_persistence_threshold=whole)


def _import_deepspeed():
    try:
        import deepspeed
    except ImportError as err:
        raise ValueError(INSTALL) from err
    return deepspeed


@contextlib.contextmanager
def _no_inference_shm_op():
    """On CPU, DeepSpeed's communication backend JIT-compiles a shared-memory all-reduce when it
    starts (about a minute on a fresh machine, with a C++ compiler); only DeepSpeed inference
    (`inference_all_reduce`) uses it, so training skips the build. A no-op elsewhere."""
    from deepspeed.accelerator import get_accelerator
    comm = importlib.import_module("deepspeed.comm.torch")
    if get_accelerator().device_name() != "cpu" or not hasattr(comm, "build_shm_op"):
        yield
        return
    saved, comm.build_shm_op = comm.build_shm_op, lambda: None
    try:
        yield
    finally:
        comm.build_shm_op = saved


def deepspeed_engine(model: torch.nn.Module, info: DistInfo, **options):
    """The engine of configs/parallel/deepspeed.yaml (`options`: its keys, see read_settings):
    check the settings; one process runs the plain model."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"parallel.{unknown[0]} is not an option of parallel=deepspeed; valid: "
                         f"{', '.join(OPTIONS)}")
    settings = read_settings(options)
    if importlib.util.find_spec("deepspeed") is None:
        raise ValueError(INSTALL)
    if info.world == 1:
        return model
    return DeepSpeedParallelized(model, model, None, settings=settings)


@dataclass
class DeepSpeedParallelized(Parallelized):
    """`module` becomes the DeepSpeed engine once `attach_optimizer` has run."""
    settings: ZeroSettings = field(default_factory=ZeroSettings)
    engine: object = None
    group_params: list = field(default_factory=list)  # the optimizer's parameters per group, in order

    def attach_optimizer(self, optimizer, *, max_norm, grad_accum, micro_batch):
        deepspeed = _import_deepspeed()
        deepspeed.utils.logger.setLevel(logging.WARNING)  # no per-step INFO lines
        with _no_inference_shm_op():
            deepspeed.init_distributed(dist_backend=dist.get_backend())  # adopts the process group
        s = self.settings
        zero = {"stage": s.stage}
        if s.stage > 0:
            zero.update(reduce_bucket_size=s.reduce_bucket_size, allgather_bucket_size=s.reduce_bucket_size,
                        overlap_comm=s.overlap_comm)
        if s.stage == 3:
            zero["stage3_param_persistence_threshold"] = s.param_persistence_threshold
        if s.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu"}
        config = {"train_micro_batch_size_per_gpu": micro_batch,
                  "gradient_accumulation_steps": grad_accum,
                  # ZeRO clips inside its step; stage 0 is clipped by the loop's default (torch)
                  "gradient_clipping": max_norm if s.stage > 0 and math.isfinite(max_norm) else 0.0,
                  "zero_optimization": zero,
                  "zero_allow_untested_optimizer": True,
                  "zero_force_ds_cpu_optimizer": False,  # offload steps the torch AdamW on CPU
                  "steps_per_print": None, "wall_clock_breakdown": False}
        self.group_params = [list(g["params"]) for g in optimizer.param_groups]
        engine, *_ = deepspeed.initialize(model=self.model, optimizer=optimizer, config=config)
        if engine.basic_optimizer is not optimizer:
            raise RuntimeError("DeepSpeed replaced the torch optimizer; the LR schedule would not apply")
        self.module = self.engine = engine

    def no_sync(self, sync: bool):
        """Mark whether the coming micro-batch ends the step (DeepSpeed reduces there)."""
        self.engine.set_gradient_accumulation_boundary(sync)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # the loop scaled it already

    def clip_and_step(self, optimizer, max_norm: float) -> float:
        """Stages 1-3 clip inside engine.step() to the max_norm given to attach_optimizer (the
        same trainer.grad_clip); ZeRO skips the update on a non-finite norm."""
        if self.settings.stage == 0:  # replicated, reduced gradients: clip as the other engines
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm).item()
            if math.isfinite(norm):
                self.engine.step()
            else:
                self.engine.zero_grad()
            return norm
        self.engine.step()  # norm, clip, AdamW on this rank's partition, all-gather parameters
        norm = self.engine.get_global_grad_norm()
        return float("nan") if norm is None else float(norm)

    # ------------------------------------------------------------------ checkpoints
    def _partitions(self, optimizer) -> list[tuple[int, torch.Tensor]]:
        """(param group, flat fp32 partition) for every partition the torch optimizer steps.
        Stages 1/2 keep one per group in its param_groups; stage 3 keeps one per sub-group and
        puts it into param_groups only while stepping it, so DeepSpeed's list is read."""
        if self.settings.stage == 3:
            zero = self.engine.optimizer
            return [(zero.sub_group_to_group_id[s], flat)
                    for s, flat in enumerate(zero.fp32_partitioned_groups_flat)]
        return [(i, flat) for i, g in enumerate(optimizer.param_groups) for flat in g["params"]]

    def _set_full(self, p: torch.Tensor, full: torch.Tensor, key: str | None = None) -> None:
        """Write this rank's part of `full` (every rank holds it) into ZeRO's fp32 master of `p`,
        or into its optimizer state `key`."""
        from deepspeed import utils
        if self.settings.stage < 3:
            if key is None:
                utils.safe_set_full_fp32_param(p, full)
            else:
                utils.safe_set_full_optimizer_state(p, full, key)
            return
        # stage 3: safe_set_full_* (DeepSpeed 0.19) reads past the end of a parameter that the
        # world size doesn't divide, on the last rank; the local setter takes our padded slice
        local = utils.safe_get_local_fp32_param(p)
        n = local.numel()
        part = torch.zeros(n, dtype=local.dtype, device=local.device)
        mine = full.reshape(-1)[dist.get_rank() * n:(dist.get_rank() + 1) * n]
        part[:mine.numel()].copy_(mine)
        if key is None:
            utils.safe_set_local_fp32_param(p, part)
        else:
            utils.safe_set_local_optimizer_state(p, part, key)

    def _whole(self, p: torch.Tensor):
        """Context in which `p` holds its full value; stage 3 gathers it and, on exit,
        re-partitions rank 0's copy."""
        if self.settings.stage < 3 or not isinstance(p, torch.nn.Parameter):  # buffers stay whole
            return contextlib.nullcontext()
        import deepspeed
        return deepspeed.zero.GatheredParameters([p], modifier_rank=0)

    sharded_checkpoints = False  # ZeRO's partitions are flat buffers, not DTensors

    def sharded_state(self, optimizer):
        raise ValueError("trainer.ckpt_format=sharded is not available under parallel=deepspeed "
                         "(ZeRO partitions are not DTensors); use full")

    def load_sharded(self, optimizer, folder):
        raise ValueError(f"checkpoint {folder} is sharded (torch.distributed.checkpoint), which "
                         "parallel=deepspeed cannot load; resume it under parallel=fsdp or ddp, or "
                         "export its model: python -m parallel.export")

    def full_state_dicts(self, optimizer):
        if self.settings.stage == 0:
            return super().full_state_dicts(optimizer)
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
        main = dist.get_rank() == 0
        self._link_optimizer_state(optimizer)
        parts = self._partitions(optimizer)
        # per-parameter entries are the partition-shaped tensors (DeepSpeed's own rule); the
        # rest (AdamW's step) is one value per partition, equal within a group
        moments = sorted({k for _, flat in parts for k, v in optimizer.state.get(flat, {}).items()
                          if torch.is_tensor(v) and v.shape == flat.shape})
        scalars = {}  # group -> its first partition's state entries other than moments
        for i, flat in parts:
            if optimizer.state.get(flat) and i not in scalars:
                scalars[i] = {k: v for k, v in optimizer.state[flat].items() if k not in moments}
        model_sd, gathered = {}, {}  # gathered: id(parameter) -> full value (tied names share it)
        for name, t in self.model.state_dict(keep_vars=True).items():
            if isinstance(t, torch.nn.Parameter) and id(t) not in gathered:
                full = safe_get_full_fp32_param(t)  # collective
                if full is None:
                    raise RuntimeError(f"DeepSpeed keeps no fp32 master weight for {name}")
                gathered[id(t)] = full.cpu() if main else None
            value = gathered[id(t)] if isinstance(t, torch.nn.Parameter) else t.detach().cpu().clone()
            if main:
                model_sd[name] = value
        names = {id(p): n for n, p in self.model.named_parameters()}
        state, groups = {}, []
        for i, params in enumerate(self.group_params):
            for p in params:
                st = {k: safe_get_full_optimizer_state(p, k) for k in moments}  # collective
                if main and (st or i in scalars):
                    moments_of_p = {k: v.cpu() for k, v in st.items()}
                    state[names[id(p)]] = {**_copied(scalars.get(i, {})), **moments_of_p}
            group = {k: v for k, v in optimizer.param_groups[i].items() if k != "params"}
            groups.append({**group, "params": [names[id(p)] for p in params]})
        return model_sd, {"state": state, "param_groups": groups}

    def _skeleton(self, model_sd, optim_sd, from_rank0) -> dict:
        """What every rank needs before the tensors arrive: the model's names, shapes and
        dtypes, the optimizer's param groups and scalars, and which entries are tensors."""
        skeleton = None
        if not from_rank0 or dist.get_rank() == 0:
            skeleton = {"model": {n: (tuple(t.shape), t.dtype) for n, t in model_sd.items()},
                        "param_groups": optim_sd["param_groups"],
                        "state": {n: {k: (_GATHERED if torch.is_tensor(v) and v.dim() > 0 else v)
                                      for k, v in st.items()} for n, st in optim_sd["state"].items()}}
        return broadcast_object(skeleton) if from_rank0 else skeleton

    def _received(self, sd: dict, name: str, key, shape, dtype, device, from_rank0) -> torch.Tensor:
        """The full tensor sd[name][key] (sd[name] when key is None) on every rank."""
        full = torch.zeros(shape, dtype=dtype, device=device)
        if not from_rank0 or dist.get_rank() == 0:
            saved = sd.get(name) if key is None else sd.get(name, {}).get(key)
            if saved is not None:
                full.copy_(saved)
        if from_rank0:
            dist.broadcast(full, src=0)
        return full

    def load_full_state_dicts(self, optimizer, model_sd, optim_sd, from_rank0):
        if self.settings.stage == 0:
            return super().load_full_state_dicts(optimizer, model_sd, optim_sd, from_rank0)
        skeleton = self._skeleton(model_sd, optim_sd, from_rank0)
        mine = self.model.state_dict(keep_vars=True)
        if sorted(skeleton["model"]) != sorted(mine):
            raise ValueError("the checkpoint's model parameters don't match this model's: "
                             f"missing {sorted(set(mine) - set(skeleton['model']))}, "
                             f"unexpected {sorted(set(skeleton['model']) - set(mine))}")
        for name, t in mine.items():  # the weights forward uses, and ZeRO's fp32 masters
            shape, dtype = skeleton["model"][name]
            full = self._received(model_sd, name, None, shape, dtype, t.device, from_rank0)
            with torch.no_grad(), self._whole(t):
                t.data.copy_(full)
            if isinstance(t, torch.nn.Parameter):
                self._set_full(t, full.float())

        names = {id(p): n for n, p in self.model.named_parameters()}
        saved_groups = skeleton["param_groups"]
        if [sorted(g["params"]) for g in saved_groups] != \
                [sorted(names[id(p)] for p in ps) for ps in self.group_params]:
            raise ValueError("the checkpoint's optimizer parameter groups don't match this model's")
        # the group's first saved parameter gives its scalars and which entries are tensors
        first = [skeleton["state"].get(names[id(ps[0])]) for ps in self.group_params]
        self._create_optimizer_state(optimizer, saved_groups, first)
        for i, params in enumerate(self.group_params):
            for key in [k for k, v in (first[i] or {}).items() if isinstance(v, str) and v == _GATHERED]:
                for p in params:
                    shape = skeleton["model"][names[id(p)]][0]
                    full = self._received(optim_sd.get("state", {}), names[id(p)], key, shape,
                                          torch.float32, p.device, from_rank0)
                    self._set_full(p, full, key)

    def _create_optimizer_state(self, optimizer, saved_groups, first) -> None:
        """Load the saved param-group settings and give every fp32 partition the saved state's
        entries (tensors as zeros, to be filled per parameter), through the torch optimizer's
        load_state_dict (which places each entry as the optimizer needs). ZeRO would create
        the state only at the first step, and the setters need it now."""
        parts = self._partitions(optimizer)
        held = [g["params"] for g in optimizer.param_groups]
        state, groups = {}, []
        for i, saved in enumerate(saved_groups):
            flats = [flat for j, flat in parts if j == i]
            optimizer.param_groups[i]["params"] = flats
            start = sum(len(g["params"]) for g in groups)
            for index, flat in enumerate(flats, start):
                if first[i] is not None:  # None: saved before any step
                    state[index] = {k: torch.zeros_like(flat) if isinstance(v, str) and v == _GATHERED
                                    else v for k, v in _copied(first[i]).items()}
            groups.append({**{k: v for k, v in saved.items() if k != "params"},
                           "params": list(range(start, start + len(flats)))})
        optimizer.load_state_dict({"state": state, "param_groups": groups})
        for group, params in zip(optimizer.param_groups, held):  # stage 3: empty between steps
            group["params"] = params
        self._link_optimizer_state(optimizer)

    def _link_optimizer_state(self, optimizer) -> None:
        """Stages 1/2: point each parameter's view of the optimizer state at its partition's
        state, which the full-state API reads and writes. DeepSpeed links them once, after the
        first group's first step, so later groups (no decay) stay unlinked (0.19.8); stage 3
        looks the state up on every call."""
        if self.settings.stage == 3:
            return
        from deepspeed.utils import lazy_init_hp_params_optimizer_state
        for i, flat in self._partitions(optimizer):
            if optimizer.state.get(flat):
                lazy_init_hp_params_optimizer_state(self.group_params[i], flat, optimizer.state)
