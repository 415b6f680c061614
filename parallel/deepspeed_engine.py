"""DeepSpeed ZeRO data parallelism: `parallel=deepspeed` (configs/parallel/deepspeed.yaml).

ZeRO stage 1 partitions the AdamW state over all ranks, stage 2 the gradients as well; stage 0
is DeepSpeed's plain data parallelism. Stage 3 (partitioned parameters) is refused: use
`parallel=fsdp` (FSDP2) to shard parameters. The run keeps the loop every engine shares
(train.py), through the `parallel.Parallelized` seam:

- forward runs through the DeepSpeed engine (its output hooks open each backward);
- accumulation: DeepSpeed's gradient_accumulation_steps is the loop's, `no_sync(last)` sets the
  engine's accumulation boundary explicitly (stage 0/1 reduce on the last micro-batch only;
  stage 2 reduce-scatters every micro-batch into the owned partition, as ZeRO-2 does) and
  `backward` is `engine.backward(loss, scale_wrt_gas=False)`: the loop already scaled the loss
  by world / global token count, so DeepSpeed must not divide by the accumulation steps again.
  DeepSpeed averages gradients over every rank (dp and cp peers alike), as DDP does;
- step: one `engine.step()` per optimizer step. Stages 1/2 clip inside the ZeRO optimizer
  (DeepSpeed's gradient_clipping = trainer.grad_clip) and report the norm before clipping
  (`engine.get_global_grad_norm()`); a non-finite norm makes ZeRO skip the update (fp32 has no
  loss scaler) and the loop stops. Stage 0 clips with torch on the reduced, replicated gradients
  (DeepSpeed's clipping off) and steps only on a finite norm;
- lr: DeepSpeed gets no scheduler. Its ZeRO optimizer steps the loop's torch AdamW, whose
  param_groups (now holding one flat fp32 partition each) the loop's LambdaLR keeps setting;
- precision: no fp16/bf16 section, so master weights, gradients and AdamW state stay fp32 and
  torch autocast in the loop decides the compute dtype, as for the other engines;
- checkpoints: the same full state dicts as every engine (parallel/checkpoint.py): the model from
  the replicated parameters, each AdamW moment reassembled per parameter from the ranks'
  partitions (reduced to rank 0); loading slices every rank's partition out of the full tensors
  rank 0 broadcasts. A checkpoint moves between engines, ZeRO stages and world sizes.

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
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     set_model_state_dict)

from parallel import Parallelized
from parallel.dist import DistInfo, broadcast_object

ZERO_STAGES = (0, 1, 2)
INSTALL = "parallel=deepspeed needs the deepspeed package: pip install deepspeed"
_GATHERED = "<per-parameter tensor>"  # marks a moment in the broadcast checkpoint skeleton


@dataclass(frozen=True)
class ZeroSettings:
    stage: int = 2
    reduce_bucket_size: int = 500_000_000
    overlap_comm: bool = False
    offload_optimizer: bool = False


def read_settings(cfg) -> ZeroSettings:
    """The parallel.* keys of configs/parallel/deepspeed.yaml, checked; one line per mistake."""
    stage = cfg.get("zero_stage", 2)
    if stage == 3 and not isinstance(stage, bool):
        raise ValueError("parallel.zero_stage=3 (partitioned parameters) is not supported; use 0, 1 "
                         "or 2, or parallel=fsdp to shard parameters")
    if isinstance(stage, bool) or stage not in ZERO_STAGES:
        raise ValueError(f"parallel.zero_stage={stage!r} must be one of 0, 1, 2")
    bucket = cfg.get("reduce_bucket_size", ZeroSettings.reduce_bucket_size)
    if isinstance(bucket, bool) or not isinstance(bucket, int) or bucket <= 0:
        raise ValueError(f"parallel.reduce_bucket_size={bucket!r} must be a positive integer (elements)")
    flags = {}
    for key in ("overlap_comm", "offload_optimizer"):
        flags[key] = cfg.get(key, False)
        if not isinstance(flags[key], bool):
            raise ValueError(f"parallel.{key}={flags[key]!r} must be true or false")
    if flags["offload_optimizer"] and stage == 0:
        raise ValueError("parallel.offload_optimizer=true needs parallel.zero_stage=1 or 2")
    return ZeroSettings(stage, bucket, **flags)


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


def deepspeed_engine(model: torch.nn.Module, info: DistInfo, cfg):
    """ENGINES["deepspeed"]: check the settings; one process runs the plain model."""
    settings = read_settings(cfg)
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
        """Stages 1/2 clip inside engine.step() to the max_norm given to attach_optimizer (the
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
    def _flat(self, optimizer, group: int) -> torch.Tensor:
        """This rank's fp32 partition of a parameter group (the torch optimizer's one parameter)."""
        (flat,) = optimizer.param_groups[group]["params"]
        return flat

    @staticmethod
    def _fragment(p: torch.Tensor):
        """(start in the flattened parameter, start in the rank's partition, length) of the part
        of `p` this rank owns, or None (DeepSpeed's lp -> hp fragment mapping)."""
        m = getattr(p, "_hp_mapping", None)
        if m is None:
            return None
        return m.lp_fragment_address.start, m.hp_fragment_address.start, m.lp_fragment_address.numel

    def full_state_dicts(self, optimizer):
        if self.settings.stage == 0:
            return super().full_state_dicts(optimizer)
        model_sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True,
                                                                            cpu_offload=True))
        names = {id(p): n for n, p in self.model.named_parameters()}
        main = dist.get_rank() == 0
        state, groups = {}, []
        for i, params in enumerate(self.group_params):
            flat = self._flat(optimizer, i)
            flat_state = optimizer.state.get(flat, {})
            for p in params:
                st = {}
                for key, value in flat_state.items():
                    if torch.is_tensor(value) and value.shape == flat.shape:  # a moment: gather
                        full = torch.zeros(p.numel(), dtype=value.dtype, device=value.device)
                        frag = self._fragment(p)
                        if frag is not None:
                            lp, hp, n = frag
                            full.narrow(0, lp, n).copy_(value.narrow(0, hp, n))
                        full = full.to(p.device)
                        dist.reduce(full, dst=0)  # every element is owned by exactly one rank
                        st[key] = full.view_as(p).cpu() if main else None
                    else:  # per-group scalars (AdamW's step)
                        st[key] = value.detach().cpu().clone() if torch.is_tensor(value) else value
                if st:
                    state[names[id(p)]] = st
            group = {k: v for k, v in optimizer.param_groups[i].items() if k != "params"}
            groups.append({**group, "params": [names[id(p)] for p in params]})
        return model_sd, {"state": state, "param_groups": groups}

    def load_full_state_dicts(self, optimizer, model_sd, optim_sd, from_rank0):
        if self.settings.stage == 0:
            return super().load_full_state_dicts(optimizer, model_sd, optim_sd, from_rank0)
        set_model_state_dict(self.model, model_sd,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=from_rank0))
        self.engine.optimizer.refresh_fp32_params()  # fp32 master partitions <- loaded weights
        # the structure (names, scalars, which entries are per-parameter tensors) from rank 0
        skeleton = None
        if not from_rank0 or dist.get_rank() == 0:
            skeleton = {"param_groups": optim_sd["param_groups"],
                        "state": {n: {k: (_GATHERED if torch.is_tensor(v) and v.dim() > 0 else v)
                                      for k, v in st.items()} for n, st in optim_sd["state"].items()}}
        if from_rank0:
            skeleton = broadcast_object(skeleton)
        names = {id(p): n for n, p in self.model.named_parameters()}
        saved_groups = skeleton["param_groups"]
        if [sorted(g["params"]) for g in saved_groups] != \
                [sorted(names[id(p)] for p in ps) for ps in self.group_params]:
            raise ValueError("the checkpoint's optimizer parameter groups don't match this model's")
        state, groups = {}, []
        for i, params in enumerate(self.group_params):
            flat = self._flat(optimizer, i)
            groups.append({**{k: v for k, v in saved_groups[i].items() if k != "params"}, "params": [i]})
            first = skeleton["state"].get(names[id(params[0])])
            if first is None:  # no step taken yet when it was saved
                continue
            st = {k: v for k, v in first.items() if not (isinstance(v, str) and v == _GATHERED)}
            for key in (k for k, v in first.items() if isinstance(v, str) and v == _GATHERED):
                buf = torch.zeros_like(flat)
                for p in params:  # rank 0 sends each full tensor (fp32, on the parameter's device)
                    full = torch.zeros(p.shape, dtype=flat.dtype, device=p.device)
                    if not from_rank0 or dist.get_rank() == 0:
                        saved = optim_sd["state"].get(names[id(p)], {}).get(key)
                        if saved is not None:
                            full.copy_(saved)
                    if from_rank0:
                        dist.broadcast(full, src=0)
                    frag = self._fragment(p)
                    if frag is not None:
                        lp, hp, n = frag
                        buf.narrow(0, hp, n).copy_(full.reshape(-1).narrow(0, lp, n))
                st[key] = buf
            state[i] = st
        optimizer.load_state_dict({"state": state, "param_groups": groups})
