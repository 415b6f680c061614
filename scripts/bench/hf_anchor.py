#!/usr/bin/env python
"""Hugging Face `transformers` Llama anchor for scripts/bench/bench_train.py: the same shape, data
and step as `train.py`, trained the way a plain HF user would, and logged in train.py's format.

    python3 scripts/bench/hf_anchor.py --model 350m --seq-len 8192 --global-batch 4 \
        --micro-batch 4 --steps 8 --out-dir /tmp/hf-350m-8k [--ac] [--compile] [--device cuda]

- Model: `LlamaForCausalLM` with configs/model/<model>.yaml's dim, layers, heads, KV heads,
  head dim, SwiGLU width, RMSNorm eps, RoPE theta, init std and tied embeddings, and our padded
  vocabulary (the byte tokenizer's 257 rounded up to `vocab_multiple`, as train.py does);
  attention `attn_implementation="sdpa"` (causal, no mask tensor: SDPA's flash backend).
- Step: fp32 master weights under bf16 autocast (CUDA; fp32 on CPU, like train.py's
  `trainer.dtype=auto`), gradient accumulation to `--global-batch` rows, the loss as a sum over
  label tokens divided by the step's token count (train.py's reduction), gradient clipping at
  1.0, fused AdamW with configs/optim/adamw.yaml's settings and warmup, activation
  checkpointing through HF's `gradient_checkpointing_enable` when `--ac`.
- Data: the builtin corpus packed into the same rows in the same order as train.py's loader
  (same seed); no document mask and positions 0..T-1 (HF's default; passing our per-document
  positions would make transformers build a block-diagonal mask tensor instead of is_causal).
- Timing: like train.py, synchronise the device at each log step and divide the wall time of the
  window by its steps. MFU uses our model's `flops_per_token` for the same shape with softmax
  attention (models/transformer.py: 6·N + causal-half attention), so ours and HF's MFU agree
  on the FLOP count; the peak is parallel/run_log.py's `peak_flops`.

Writes `<out-dir>/metrics.jsonl` (one line per log step: step, loss, lr, grad_norm,
tokens_per_s, tgs, step_time_s, mfu, peak_mem_gb) and `<out-dir>/anchor.json` (shape,
parameter counts of HF's model and of ours, FLOPs per token).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

from harness import ROOT


def load_yaml(path: Path) -> dict:
    import yaml
    with open(path) as f:
        return yaml.safe_load(f)


def padded_vocab(m: dict, tokenizer_vocab: int) -> int:
    """train.build_model_config's rule: model.vocab_size, or the tokenizer's padded up."""
    if m.get("vocab_size") is not None:
        return int(m["vocab_size"])
    mult = int(m["vocab_multiple"])
    return mult * math.ceil(tokenizer_vocab / mult)


def our_model_config(m: dict, vocab: int, seq_len: int):
    """Our ModelConfig of the same shape with softmax attention (for FLOPs and parameters)."""
    from models import ModelConfig
    return ModelConfig(vocab_size=vocab, dim=m["dim"], n_layers=m["n_layers"],
                       n_heads=m["n_heads"], n_kv_heads=m["n_kv_heads"], head_dim=m["head_dim"],
                       ffn_dim=m["ffn_dim"], ffn_multiple=m["ffn_multiple"],
                       max_seq_len=max(seq_len, int(m["max_seq_len"])),
                       rope_theta=m["rope_theta"], norm_eps=m["norm_eps"],
                       tie_embeddings=m["tie_embeddings"], init_std=m["init_std"], attn="sdpa")


def hf_config(cfg):
    """LlamaConfig equal in shape to our ModelConfig `cfg` (ffn_dim, n_kv_heads resolved)."""
    from transformers import LlamaConfig
    return LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim or cfg.dim // cfg.n_heads,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.init_std,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        # byte vocabulary: no special ids (the defaults 1/2 are Llama-tokenizer ids)
        bos_token_id=None, eos_token_id=None, pad_token_id=None, use_cache=False)


def ours_flops_and_params(cfg, seq_len: int) -> tuple[float, int]:
    import torch
    from models import Transformer
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = Transformer(cfg)
    return model.flops_per_token(seq_len), model.num_params()


def build_batches(args, data_cfg: dict, tokenizer, accum: int):
    from data import builtin_corpus, default_cache_dir
    from data.loader import PackedBatches
    max_bytes = int(args.max_bytes or data_cfg["max_bytes"])
    cache = os.path.expanduser(os.environ.get("LONGCTX_CACHE") or default_cache_dir())
    train = builtin_corpus("train", tokenizer, cache, max_bytes=max_bytes,
                           val_percent=int(data_cfg["val_percent"]))
    return PackedBatches(train.tokens, args.seq_len, args.micro_batch, accum,
                         shuffle=bool(data_cfg["shuffle"]), seed=args.seed,
                         document_mask=False, bos_id=tokenizer.bos_id)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="350m", help="configs/model/<name>.yaml")
    ap.add_argument("--seq-len", type=int, required=True)
    ap.add_argument("--global-batch", type=int, required=True, help="rows per optimizer step")
    ap.add_argument("--micro-batch", type=int, required=True, help="rows per forward")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--log-every", type=int, default=1)
    ap.add_argument("--ac", action="store_true", help="HF gradient checkpointing (non-reentrant)")
    ap.add_argument("--compile", action="store_true", help="torch.compile every decoder layer")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--max-bytes", type=int, default=None, help="data.max_bytes (default: yaml)")
    ap.add_argument("--warmup-steps", type=int, default=None, help="default: optim yaml")
    ap.add_argument("--peak-tflops", type=float, default=None, help="as trainer.peak_tflops")
    ap.add_argument("--seed", type=int, default=1234, help="as trainer.seed")
    ap.add_argument("--out-dir", required=True)
    args = ap.parse_args(argv)
    for flag in ("seq_len", "global_batch", "micro_batch", "steps", "log_every"):
        if getattr(args, flag) <= 0:
            ap.error(f"--{flag.replace('_', '-')}={getattr(args, flag)} must be positive")
    if args.global_batch % args.micro_batch:
        ap.error(f"--global-batch={args.global_batch} must be a multiple of "
                 f"--micro-batch={args.micro_batch}")
    accum = args.global_batch // args.micro_batch

    import torch
    import torch.nn.functional as F
    from data.tokenizer import ByteTokenizer
    # train.py's own helpers, so MFU, memory and the LR schedule are computed identically
    from parallel.run_log import peak_flops, peak_memory_gb
    from train import lr_lambda

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device=cuda but no CUDA device is available")
    device = torch.device(args.device)
    amp = {"auto": torch.bfloat16 if device.type == "cuda" else None,
           "bf16": torch.bfloat16, "fp32": None}[args.dtype]
    autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp else nullcontext

    model_yaml = ROOT / "configs" / "model" / f"{args.model}.yaml"
    if not model_yaml.exists():
        ap.error(f"--model={args.model}: no {model_yaml.relative_to(ROOT)}")
    m = load_yaml(model_yaml)
    data_cfg = load_yaml(ROOT / "configs" / "data" / "builtin.yaml")
    optim = load_yaml(ROOT / "configs" / "optim" / "adamw.yaml")
    tokenizer = ByteTokenizer()
    cfg = our_model_config(m, padded_vocab(m, tokenizer.vocab_size), args.seq_len)
    flops_tok, ours_params = ours_flops_and_params(cfg, args.seq_len)

    from transformers import LlamaForCausalLM
    torch.manual_seed(args.seed)
    with torch.device(device):  # initialise on the device (a 350m CPU init takes seconds)
        model = LlamaForCausalLM._from_config(hf_config(cfg), attn_implementation="sdpa",
                                              dtype=torch.float32)
    model.train()
    hf_params = sum(p.numel() for p in model.parameters())  # tied weights counted once
    if args.ac:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.compile:
        for layer in model.model.layers:
            layer.compile()

    embed = model.get_input_embeddings().weight
    decay = [p for p in model.parameters() if p.dim() >= 2 and p is not embed]
    no_decay = [p for p in model.parameters() if p.dim() < 2 or p is embed]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": optim["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=optim["lr"], betas=tuple(optim["betas"]), eps=optim["eps"],
                            fused=device.type == "cuda")
    warmup = optim["warmup_steps"] if args.warmup_steps is None else args.warmup_steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambda(warmup, args.steps, optim["min_lr_ratio"]))
    batches = build_batches(args, data_cfg, tokenizer, accum)
    peak = peak_flops(args.peak_tflops, device)

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = {"model": args.model, "seq_len": args.seq_len, "vocab_size": cfg.vocab_size,
            "dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
            "n_kv_heads": cfg.n_kv_heads, "ffn_dim": cfg.ffn_dim, "rope_theta": cfg.rope_theta,
            "tie_embeddings": cfg.tie_embeddings, "params_hf": hf_params,
            "params_ours": ours_params, "flops_per_token": flops_tok,
            "attn_implementation": model.config._attn_implementation,
            "grad_accum": accum, "ac": args.ac, "compile": args.compile,
            "dtype": str(amp).replace("torch.", "") if amp else "fp32",
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    (out_dir / "anchor.json").write_text(json.dumps(info, indent=1))
    print(f"hf anchor: LlamaForCausalLM {hf_params / 1e6:.2f}M parameters (ours "
          f"{ours_params / 1e6:.2f}M), {cfg.n_layers} layers, sdpa; device {device}, "
          f"grad_accum {accum}, {args.global_batch * args.seq_len} tokens/step", flush=True)
    if hf_params != ours_params:  # a shape mismatch would make the comparison meaningless
        print(f"warning: parameter counts differ (HF {hf_params}, ours {ours_params})",
              file=sys.stderr)

    tokens_per_step = args.global_batch * args.seq_len
    log = open(out_dir / "metrics.jsonl", "a", buffering=1)
    t_last, since, loss_acc = time.perf_counter(), 0, 0.0
    for step in range(1, args.steps + 1):
        micro = batches.next_step()
        n_tokens = sum(int((mb["labels"] != -100).sum()) for mb in micro)  # host: no sync
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for mb in micro:
            ids, labels = (mb[k].pin_memory().to(device, non_blocking=True)
                           if device.type == "cuda" else mb[k] for k in ("input_ids", "labels"))
            with autocast():
                logits = model(input_ids=ids, use_cache=False).logits
            # HF's ForCausalLMLoss upcasts the logits to fp32 the same way; our labels are
            # already the next tokens, so no shift here
            part = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(),
                                   ignore_index=-100, reduction="sum")
            (part / n_tokens).backward()
            loss_sum += part.detach().double()
        loss = loss_sum.item() / n_tokens  # one host sync per step, as in train.py
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        if not math.isfinite(loss):
            sys.exit(f"error: non-finite loss {loss} at step {step}")
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        since += 1
        loss_acc += loss
        if step % args.log_every == 0 or step == args.steps:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = (time.perf_counter() - t_last) / since
            tok_s = tokens_per_step / dt
            rec = {"step": step, "loss": loss_acc / since, "lr": lr,
                   "grad_norm": float(grad_norm), "tokens_per_s": tok_s, "tgs": tok_s,
                   "step_time_s": dt, "mfu": flops_tok * tok_s / peak if peak else None,
                   "peak_mem_gb": peak_memory_gb(device)}
            log.write(json.dumps(rec) + "\n")
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in rec.items() if v is not None), flush=True)
            t_last, since, loss_acc = time.perf_counter(), 0, 0.0
    log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
