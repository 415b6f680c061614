"""Train a decoder-only LM: `python train.py [group=option ...] [key=value ...]`.

Compose the config, set up distribution, build data and model, parallelize, loop, log,
checkpoint. `run()` returns the final validation loss (Hydra sweepers minimise it).
"""
from __future__ import annotations

import inspect
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from data.prefetch import StepPrefetcher
from models import ModelConfig, Transformer
from parallel import BlockWrapping, CPSettings, build_mesh, init_distributed, parallelize
from parallel.checkpoint import (clean_temporaries, complete_checkpoints, complete_pending,
                                 last_good_checkpoint, load_checkpoint, resolve_resume,
                                 save_checkpoint)
from parallel.dist import all_reduce_sum, broadcast_object, shutdown
from parallel.run_folder import (EXIT_PREEMPTED, Preempted, RunFolderInUse, RunLock, StopRequests,
                                 check_resume, truncate_metrics)
from parallel.run_log import (MetricsLog, StepProfiler, attn_label, peak_flops, peak_memory_gb,
                              sweep_label, write_summary)

class ConfigError(ValueError):
    """A setting that cannot work; the message names the key and the rule."""


# ----------------------------------------------------------------------------- setup helpers
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but no CUDA device is available; use cpu or auto")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"trainer.device={name!r} must be auto, cpu or cuda")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype, or None for plain fp32."""
    table = {"bf16": torch.bfloat16, "fp32": None}
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if name not in table:
        raise ConfigError(f"trainer.dtype={name!r} must be auto, bf16 or fp32")
    return table[name]


def grad_accum_steps(tr: DictConfig, dp_world: int) -> int:
    per_step = tr.micro_batch * dp_world
    if tr.micro_batch <= 0 or tr.global_batch <= 0 or tr.global_batch % per_step:
        raise ConfigError(f"trainer.global_batch={tr.global_batch} must be a positive multiple of "
                          f"trainer.micro_batch × data-parallel ranks = {tr.micro_batch} × {dp_world}")
    return tr.global_batch // per_step


# the least integer each may be (0: off); trainer.run_steps may also be null
AT_LEAST = {f"trainer.{k}": n for k, n in dict(
    steps=1, run_steps=1, seq_len=1, micro_batch=1, global_batch=1, log_every=1, val_every=0,
    ckpt_every=0, ckpt_keep=1, prefetch=1, profile_steps=0).items()} | {"optim.warmup_steps": 0}


def check_trainer(cfg: DictConfig) -> None:
    """The loop's settings, before any work: a ConfigError naming the first bad key and rule."""
    for key, least in AT_LEAST.items():
        value = OmegaConf.select(cfg, key, default=AT_LEAST)  # AT_LEAST: the key is not set
        if value is AT_LEAST or (value is None and key == "trainer.run_steps"):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            tail = " or null" if key == "trainer.run_steps" else " (0: off)" if least == 0 else ""
            raise ConfigError(f"{key}={value!r} must be an integer >= {least}{tail}")
    lr, resume = OmegaConf.select(cfg, "optim.lr"), cfg.trainer.get("resume")
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0):
        raise ConfigError(f"optim.lr={lr!r} must be a number > 0")
    if resume is not None and not isinstance(resume, str):  # YAML true/false, a number
        raise ConfigError(f"trainer.resume={resume!r} must be auto, none or a checkpoint folder path")
    fmt, asynchronous = cfg.trainer.get("ckpt_format", "auto"), cfg.trainer.get("ckpt_async", False)
    if fmt not in ("auto", "full", "sharded"):
        raise ConfigError(f"trainer.ckpt_format={fmt!r} must be auto, full or sharded")
    if not isinstance(asynchronous, bool):
        raise ConfigError(f"trainer.ckpt_async={asynchronous!r} must be true or false")
    if asynchronous and fmt == "full":
        raise ConfigError("trainer.ckpt_async=true needs trainer.ckpt_format=sharded (or auto "
                          "under FSDP2): full checkpoints are gathered and written by rank 0")


def checkpoint_format(tr: DictConfig, par) -> str:
    """trainer.ckpt_format for this run: auto is sharded when the engine shards the parameters
    over several processes (FSDP2), else full."""
    fmt = tr.get("ckpt_format", "auto")
    if fmt == "auto":
        fmt = "sharded" if par.shards_parameters else "full"
    if fmt == "sharded" and not par.sharded_checkpoints:
        raise ConfigError("trainer.ckpt_format=sharded is not available under this engine "
                          "(parallel=deepspeed); use full")
    if tr.get("ckpt_async", False) and fmt != "sharded":
        raise ConfigError("trainer.ckpt_async=true needs sharded checkpoints: set "
                          "trainer.ckpt_format=sharded (auto is full without FSDP2)")
    return fmt


def build_model_config(cfg: DictConfig, vocab: int) -> ModelConfig:
    m = cfg.model
    if cfg.trainer.seq_len > m.max_seq_len:
        raise ConfigError(f"trainer.seq_len={cfg.trainer.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    if m.vocab_size is None:
        vocab = m.vocab_multiple * math.ceil(vocab / m.vocab_multiple)
    elif m.vocab_size < vocab:
        raise ConfigError(f"model.vocab_size={m.vocab_size} is smaller than the tokenizer's {vocab}")
    else:
        vocab = m.vocab_size
    attn_options = {k: v for k, v in OmegaConf.to_container(cfg.attn).items() if k != "name"}
    pattern = list(m.layer_pattern) if m.layer_pattern else []
    given = m.get("layer_options") or {}
    given = OmegaConf.to_container(given) if OmegaConf.is_config(given) else dict(given)
    for family in given:
        if family not in pattern or family == cfg.attn.name:
            raise ConfigError(f"model.layer_options.{family}: options for a model.layer_pattern "
                              f"family other than attn={cfg.attn.name} (pattern: {pattern}); "
                              f"attn={cfg.attn.name} takes attn.*")
    layer_options = {}
    for family in dict.fromkeys(pattern):
        if family == cfg.attn.name:
            continue
        # the family's own defaults (as attn=<family> would give), then the overrides
        path = Path(__file__).resolve().parent / "configs" / "attn" / f"{family}.yaml"
        defaults = OmegaConf.to_container(OmegaConf.load(path)) if path.exists() else {}
        defaults.pop("name", None)
        unknown = set(given.get(family, {})) - set(defaults)
        if unknown:
            raise ConfigError(f"model.layer_options.{family}: unknown key(s) "
                              f"{', '.join(sorted(unknown))}; configs/attn/{family}.yaml has "
                              f"{', '.join(sorted(defaults)) or 'none'}")
        layer_options[family] = {**defaults, **given.get(family, {})}
    return ModelConfig(vocab_size=vocab, dim=m.dim, n_layers=m.n_layers, n_heads=m.n_heads,
                       n_kv_heads=m.n_kv_heads, head_dim=m.head_dim, ffn_dim=m.ffn_dim,
                       ffn_multiple=m.ffn_multiple, max_seq_len=m.max_seq_len,
                       rope_theta=m.rope_theta, norm_eps=m.norm_eps, tie_embeddings=m.tie_embeddings,
                       init_std=m.init_std, loss_chunk=m.loss_chunk, attn=cfg.attn.name,
                       attn_options=attn_options, layer_options=layer_options,
                       layer_pattern=pattern or None)


# optim.* keys of the LR schedule; the rest of the group is the optimizer's `_target_` call
SCHEDULE_KEYS = ("scheduler", "warmup_steps", "min_lr_ratio")


def _build(spec: dict, key: str, *args):
    """`spec`'s `_target_` through hydra.utils.instantiate (`_partial_: true`: train.py supplies
    `args`, the spec's other keys are keyword arguments, as plain Python values); any failure is
    one ConfigError naming `key`."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    if "_target_" not in spec or spec.get("_partial_") is not True:
        raise ConfigError(f"{key} needs _target_ (what to call) and _partial_: true (train.py "
                          "passes the positional arguments)")
    try:
        return instantiate(spec, _convert_="all")(*args)
    except (InstantiationException, TypeError, ValueError) as err:
        raise ConfigError(f"{key} (_target_: {spec['_target_']}): {' '.join(str(err).split())}") from err


def build_engine(parallel_cfg: DictConfig):
    """parallel._target_ as the engine `f(model, info)` parallelize calls: the group's keys but
    `backend` (init_distributed's) are its options. An unknown target or option is one
    ConfigError naming the group; the engine's own checks name their key."""
    spec = {k: v for k, v in OmegaConf.to_container(parallel_cfg, resolve=True).items()
            if k != "backend"}

    def engine(model, info):
        from hydra.errors import InstantiationException
        if "_target_" not in spec or spec.get("_partial_") is not True:
            raise ConfigError("parallel needs _target_ (the engine) and _partial_: true "
                              "(train.py passes the model and the DistInfo)")
        try:
            from hydra.utils import instantiate
            built = instantiate(spec, _convert_="all")
        except InstantiationException as err:
            raise ConfigError(f"parallel (_target_: {spec['_target_']}): "
                              f"{' '.join(str(err).split())}") from err
        try:  # an option the engine does not take, checked before the call
            inspect.signature(built).bind(model, info)
        except (TypeError, ValueError) as err:
            options = sorted(k for k in spec if not k.startswith("_"))
            raise ConfigError(f"parallel (_target_: {spec['_target_']}) does not take these "
                              f"options: {', '.join(options)} ({err})") from err
        return built(model, info)
    return engine


def build_optimizer(model: torch.nn.Module, o: DictConfig, device: torch.device) -> torch.optim.Optimizer:
    """optim._target_ called with two parameter groups: weight decay (optim.weight_decay) on the
    matrices, none on the embedding, norms and biases. `fused: auto` is resolved first: fused
    kernels on CUDA only."""
    decay = [p for p in model.parameters() if p.dim() >= 2 and p is not getattr(model, "embed").weight]
    no_decay = [p for p in model.parameters() if all(p is not q for q in decay)]
    spec = {k: v for k, v in OmegaConf.to_container(o, resolve=True).items() if k not in SCHEDULE_KEYS}
    if "fused" in spec:
        if spec["fused"] not in ("auto", True, False):
            raise ConfigError(f"optim.fused={spec['fused']!r} must be auto, true or false")
        spec["fused"] = device.type == "cuda" if spec["fused"] == "auto" else spec["fused"]
    return _build(spec, "optim", [{"params": decay, "weight_decay": spec.get("weight_decay", 0.0)},
                                  {"params": no_decay, "weight_decay": 0.0}])


def build_scheduler(optimizer: torch.optim.Optimizer, o: DictConfig):
    """optim.scheduler._target_ called with the optimizer (default: warmup_cosine)."""
    return _build(OmegaConf.to_container(o.scheduler, resolve=True), "optim.scheduler", optimizer)


def warmup_cosine(optimizer: torch.optim.Optimizer, *, warmup_steps: int, min_lr_ratio: float,
                  total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over `warmup_steps`, then cosine decay to min_lr_ratio·lr at `total_steps`."""
    if warmup_steps < 0 or not 0 <= min_lr_ratio <= 1:
        raise ValueError(f"warmup_steps={warmup_steps} must be >= 0 and min_lr_ratio={min_lr_ratio} "
                         "within [0, 1]")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup_steps, total_steps, min_lr_ratio))


def lr_lambda(warmup: int, total: int, min_ratio: float):
    def f(step: int) -> float:  # multiplier of optim.lr at scheduler step `step`
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


# logger.* keys train.py reads itself; the rest of the group is the sink's `_target_` call
LOGGER_KEYS = ("console",)


def open_metrics_log(out_dir: Path, cfg: DictConfig, is_main: bool) -> MetricsLog:
    """The run's MetricsLog: console lines per logger.console; logger._target_, when the group
    names one (logger=wandb; jsonl and none do not), called with the run folder and the full
    config on rank 0 as the extra sink."""
    spec = {k: v for k, v in OmegaConf.to_container(cfg.logger, resolve=True).items()
            if k not in LOGGER_KEYS}
    return MetricsLog(out_dir, console=bool(cfg.logger.get("console", True)), is_main=is_main,
                      open_sink=(lambda: _build(spec, "logger", out_dir, cfg)) if spec else None)


# ----------------------------------------------------------------------------- the loop
def evaluate(model, batches, device, autocast) -> float:
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad(), autocast():
        for mb in batches:
            loss_sum, n = model(*_inputs(mb, device))
            sums += torch.stack([loss_sum.double(), n.double()])
    model.train()
    all_reduce_sum(sums)
    return (sums[0] / sums[1]).item()


def _inputs(mb: dict, device):
    # non-blocking from pinned host memory (the prefetcher pins on CUDA): no sync per batch
    cu = mb.get("cu_seqlens")
    out = tuple(None if t is None else t.to(device, non_blocking=True)
                for t in (mb["input_ids"], mb["positions"], mb["labels"], cu))
    if out[3] is not None:
        # the document count changes every batch: compiled blocks take it as a dynamic size from
        # their first compile (the recompile that would otherwise make it dynamic also turned
        # B and T symbolic, and AOTAutograd then rebuilt an aliased output with garbage sizes:
        # torch 2.13 inductor, linear-family blocks with micro_batch > 1)
        torch._dynamo.maybe_mark_dynamic(out[3], 0)
    return out


def run(cfg: DictConfig, out_dir: str | Path) -> float:
    check_trainer(cfg)
    out_dir = Path(out_dir)
    tr = cfg.trainer
    device = resolve_device(tr.device)
    info = init_distributed(device.type, cfg.parallel.backend)
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    amp_dtype = resolve_dtype(tr.dtype, device)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else nullcontext
    cp = CPSettings.from_config(cfg.cp, world=info.world,
                                tokens_per_micro_batch=tr.micro_batch * tr.seq_len)
    blocks = BlockWrapping.from_trainer(tr)
    mesh = build_mesh(info, cp.size, cp.ulysses, device.type)
    accum = grad_accum_steps(tr, mesh.dp)
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(out_dir, info)
    lock.acquire()
    stops = StopRequests(tr.get("stop_signals", ("SIGTERM", "SIGUSR1")))
    try:
        return _run(cfg, out_dir, tr, device, info, autocast, cp, blocks, mesh, accum, lock,
                    stops)
    finally:
        stops.restore()
        lock.release()


def _run(cfg, out_dir, tr, device, info, autocast, cp, blocks, mesh, accum, lock, stops) -> float:
    """The run after its settings are checked and its folder is held (see `run`)."""
    from data import build_data

    torch.manual_seed(tr.seed)
    validate = bool(tr.val_every)  # 0: no validation at all, and no validation split is read
    tokenizer, train_batches, val_batches = build_data(
        cfg.data, seq_len=tr.seq_len, micro_batch=tr.micro_batch, grad_accum=accum,
        dp_rank=mesh.dp_rank, dp_world=mesh.dp, seed=tr.seed, with_val=validate)
    model = Transformer(build_model_config(cfg, tokenizer.vocab_size)).to(device)
    # counted before the engine: ZeRO-3 leaves partitioned parameters empty
    n_params, flops_tok = model.num_params(), model.flops_per_token(tr.seq_len)
    par = parallelize(model, info, build_engine(cfg.parallel), mesh, cp, blocks)
    val_batches = [par.shard(mb) for mb in val_batches]
    optimizer = build_optimizer(model, cfg.optim, device)
    clip = tr.grad_clip if tr.grad_clip else float("inf")
    par.attach_optimizer(optimizer, max_norm=clip, grad_accum=accum, micro_batch=tr.micro_batch)
    scheduler = build_scheduler(optimizer, cfg.optim)

    ckpt_dir = out_dir / tr.ckpt_dir
    step = 0
    plain_cfg = OmegaConf.to_container(cfg, resolve=True)
    clean_temporaries(ckpt_dir, info)  # the folder is ours (locked): no live save is writing
    resume_from = resolve_resume(tr.resume, ckpt_dir, info)
    existing = broadcast_object(complete_checkpoints(ckpt_dir) if info.is_main else None)
    check_resume(tr.resume, existing, resume_from, plain_cfg,
                 bool(tr.get("allow_config_change", False)))
    if resume_from is not None:
        step, data_state = load_checkpoint(resume_from, info, par, optimizer, scheduler)
        train_batches.load_state_dict(data_state)
        if info.is_main:  # rows a crashed run logged after this checkpoint are redone
            truncate_metrics(out_dir / "metrics.jsonl", step)
    prefetch = StepPrefetcher(train_batches, par.shard, depth=int(tr.get("prefetch", 2)),
                              pin=device.type == "cuda")

    ckpt_format, ckpt_async = checkpoint_format(tr, par), bool(tr.get("ckpt_async", False))

    def checkpoint(at: int):
        save_checkpoint(ckpt_dir, at, info, par, optimizer, scheduler, prefetch.state_dict(),
                        plain_cfg, keep=tr.ckpt_keep, fmt=ckpt_format, async_save=ckpt_async)

    start_step = step
    log = open_metrics_log(out_dir, cfg, info.is_main)
    peak = peak_flops(tr.peak_tflops, device)
    tokens_per_step = tr.global_batch * tr.seq_len
    stop = tr.steps if tr.run_steps is None else min(tr.steps, step + tr.run_steps)
    if info.is_main:
        print(f"model: {n_params / 1e6:.2f}M parameters, {len(model.layers)} layers "
              f"({', '.join(sorted(set(model.cfg.layer_families())))}); device {device}, "
              f"{info.world} process(es), grad_accum {accum}, {tokens_per_step} tokens/step; "
              + (f"resumed from {resume_from} at step {step}" if resume_from else "fresh start"))
    profiler = (StepProfiler(int(tr.profile_steps), out_dir, device)
                if tr.get("profile_steps") and info.is_main else None)
    bar = None
    if tr.progress and info.is_main and step < stop:
        from tqdm import tqdm
        bar = tqdm(total=stop, initial=step, desc="train", dynamic_ncols=True, file=sys.stdout)

    val_loss = float("nan")
    last_train_loss = float("nan")
    t_last, steps_since, loss_acc = time.perf_counter(), 0, 0.0
    t_start, windows = time.perf_counter(), []  # (tokens/s, MFU, peak memory) per log window
    while step < stop:
        micro_batches = prefetch.next_step()
        n_local = sum(mb["n_counted"] for mb in micro_batches)
        # [token count, loss sum, stop requests]: the count is reduced first; the loss and the
        # ranks' stop requests (signals) are reduced together and read once
        sums = torch.tensor([n_local, 0.0, 0.0], dtype=torch.float64).to(device, non_blocking=True)
        if info.world > 1:
            all_reduce_sum(sums[:1])
        # DDP, FSDP2 and ZeRO average gradients over all ranks (dp and cp): scale by the world
        # size so the result is the gradient of (global loss sum / global token count)
        grad_scale = (info.world / sums[0]).float()
        for i, mb in enumerate(micro_batches):
            with par.no_sync(i == len(micro_batches) - 1), autocast():
                part, _ = par.module(*_inputs(mb, device))
            par.backward(part * grad_scale)
            sums[1] += part.detach().double()
        sums[2] = stops.requested
        if info.world > 1:
            all_reduce_sum(sums[1:])
        n_global, loss_total, stop_asked = sums.tolist()
        loss = loss_total / n_global
        # clip, update, clear gradients; no update when the loss or the gradient norm isn't finite
        grad_norm = par.clip_and_step(optimizer, clip) if math.isfinite(loss) else float("nan")
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            complete_pending(info)  # the last good step's checkpoint, if still being written
            log.close()
            prefetch.close()
            at = f"at step {step + 1}"
            bad = (f"loss {loss} {at}" if not math.isfinite(loss)
                   else f"gradient norm {grad_norm} {at} (loss {loss:.4g})")
            raise FloatingPointError(f"non-finite {bad}; stopped without updating (last good "
                                     f"checkpoint: {last_good_checkpoint(ckpt_dir, info)})")
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        step += 1
        steps_since += 1
        loss_acc += loss
        last_train_loss = loss
        if profiler is not None:
            profiler.step()
        if bar is not None:
            bar.update(1)
        if step % tr.log_every == 0 or step == stop:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = (time.perf_counter() - t_last) / steps_since
            tok_s = tokens_per_step / dt
            windows.append((tok_s, flops_tok * tok_s / info.world / peak if peak else None,
                            peak_memory_gb(device)))
            log.log({"step": step, "loss": loss_acc / steps_since, "lr": lr, "grad_norm": grad_norm,
                     "tokens_per_s": tok_s, "tgs": tok_s / info.world, "step_time_s": dt,
                     "mfu": flops_tok * tok_s / info.world / peak if peak else None,
                     "peak_mem_gb": peak_memory_gb(device)}, bar)
            if bar is not None:
                bar.set_postfix(loss=f"{loss_acc / steps_since:.3f}", tok_s=f"{tok_s:.3g}")
            t_last, steps_since, loss_acc = time.perf_counter(), 0, 0.0
            lock.refresh()
        t_aside = time.perf_counter()  # validation and checkpoints stay out of tokens/s
        if validate and (step % tr.val_every == 0 or step == stop):
            val_loss = evaluate(model, val_batches, device, autocast)
            log.log({"step": step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))}, bar)
        saved = (tr.ckpt_every and step % tr.ckpt_every == 0) or (step == stop and tr.ckpt_every)
        if saved:
            t_ckpt = time.perf_counter()
            checkpoint(step)
            log.log({"step": step, "ckpt_s": time.perf_counter() - t_ckpt,
                     "ckpt_format": ckpt_format + (" async" if ckpt_async else "")}, bar)
        t_last += time.perf_counter() - t_aside
        if stop_asked:  # a signal on any rank: every rank stops after the same step
            if not saved:
                checkpoint(step)
            complete_pending(info)
            log.close()
            prefetch.close()
            raise Preempted(step, stops.signame or "a peer rank's signal")
    prefetch.close()
    complete_pending(info)  # an async checkpoint of the last step: on disk before the end
    if bar is not None:
        bar.close()
    if info.is_main and start_step >= stop:
        print(f"nothing to train: already at step {step} of {tr.steps}")
    if validate and math.isnan(val_loss):  # nothing left to train (already finished): report
        val_loss = evaluate(model, val_batches, device, autocast)
    if info.is_main:
        if validate:
            print(f"final validation loss {val_loss:.4f} (ppl {math.exp(min(val_loss, 50)):.2f}) "
                  f"at step {step}")
        else:  # trainer.val_every=0: the last step's training loss is the run's result
            print(f"final training loss {last_train_loss:.4f} at step {step} (validation off: "
                  "trainer.val_every=0)")
    # a resumed run that had nothing left to do keeps the summary of the invocation that trained
    if info.is_main and (windows or not (out_dir / "summary.json").exists()):
        # the first window holds the compile and warm-up steps: left out when others exist
        steady = windows[1:] or windows
        median = (lambda xs: sorted(xs)[len(xs) // 2] if xs else None)
        write_summary(out_dir, log, {
            "run_name": cfg.run_name, "attn": attn_label(model.cfg), "model": cfg.model.name,
            "seq_len": tr.seq_len, "steps": step, "params": n_params,
            "final_val_loss": val_loss if validate else None,
            "final_train_loss": None if math.isnan(last_train_loss) else last_train_loss,
            "tokens_per_s": median([w[0] for w in steady]),
            "mfu": median([w[1] for w in steady if w[1] is not None]),
            "peak_mem_gb": max((w[2] for w in windows), default=None),
            "wall_s": time.perf_counter() - t_start})
    log.close()
    return val_loss if validate else last_train_loss


def _hydra_main():
    import hydra
    from hydra.core.hydra_config import HydraConfig
    OmegaConf.register_new_resolver("sweep_label", sweep_label, replace=True)

    @hydra.main(config_path="configs", config_name="train", version_base="1.3")
    def main(cfg: DictConfig) -> float:
        try:
            result = run(cfg, HydraConfig.get().runtime.output_dir)
            shutdown(together=True)
            return result
        except (ValueError, FloatingPointError, RunFolderInUse) as err:  # config, input, folder
            if os.environ.get("LONGCTX_TRACEBACK"):
                raise
            sys.exit(f"error: {err}")
        except Preempted as stopped:
            print(stopped, file=sys.stderr)
            sys.exit(EXIT_PREEMPTED)
        finally:
            shutdown()  # the error paths (no-op after the normal one)

    main()


if __name__ == "__main__":
    _hydra_main()
