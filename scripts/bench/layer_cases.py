"""The attention layer cases that scripts/bench/ab_kernels.py times and scripts/tune/host_profile.py
profiles: one call of a family's public op on CUDA bf16 inputs at 16k tokens per sequence (64k for
the *64k cases). `attn` is imported when a case is built, so a caller that put a checkout first on
sys.path gets that checkout's kernels.

  flash      causal, GQA 16 / 4, D 128          flash64   2 x 8k, 16 heads, D 64 (the 350m layer)
  lightning  batch 4, 16 heads, ALiBi slopes    moba      16 / 4 heads, block 512, top-3
  moba64k    64k, 16 / 16 heads (bench_moba.py's layer)   moba64k_gqa  64k, 16 / 4 heads
  nsa        64 / 4 heads, compression 32 / 16  nsa64k    the same at 64k
  nsa64k_b64 64k, 64 / 4 heads, fla's geometry (compression 64 / 64, selection blocks of 64)
"""
from __future__ import annotations

import torch

T, H, HKV, D = 16384, 16, 4, 128
CASES = ("flash", "flash64", "lightning", "moba", "moba64k", "moba64k_gqa", "nsa", "nsa64k",
         "nsa64k_b64")


def case(name: str):
    """(fn, inputs): the case's layer call and its differentiable inputs."""
    dev, bf = "cuda", torch.bfloat16

    def randn(*shape):
        return torch.randn(*shape, device=dev, dtype=bf).requires_grad_()
    if name == "flash":
        from attn.flash import flash_attn
        q, k, v = randn(1, T, H, D), randn(1, T, HKV, D), randn(1, T, HKV, D)
        return lambda: flash_attn(q, k, v), (q, k, v)
    if name == "flash64":
        from attn.flash import flash_attn
        q, k, v = (randn(2, T // 2, H, 64) for _ in range(3))
        return lambda: flash_attn(q, k, v), (q, k, v)
    if name == "lightning":
        from attn.lightning import lightning_attn
        q, k, v = (randn(4, T, H, D) for _ in range(3))  # one sequence: launch-bound, +-10 %
        slopes = torch.linspace(0.01, 0.5, H, device=dev)
        return lambda: lightning_attn(q, k, v, slopes)[0], (q, k, v)
    if name in ("moba", "moba64k", "moba64k_gqa"):
        from attn.moba import moba_attn
        t = T if name == "moba" else 4 * T
        hkv = H if name == "moba64k" else HKV
        q, k, v = randn(1, t, H, D), randn(1, t, hkv, D), randn(1, t, hkv, D)
        return lambda: moba_attn(q, k, v, block_size=512, topk=3), (q, k, v)
    if name in ("nsa", "nsa64k", "nsa64k_b64"):
        from attn.nsa import nsa_attn
        t = T if name == "nsa" else 4 * T
        cb, cs = (64, 64) if name == "nsa64k_b64" else (32, 16)
        q, k, v = randn(1, t, 64, D), randn(1, t, HKV, D), randn(1, t, HKV, D)
        tc = (t - cb) // cs + 1
        kc, vc = randn(1, tc, HKV, D), randn(1, tc, HKV, D)
        g = [torch.rand(1, t, 64, device=dev, dtype=bf).requires_grad_() for _ in range(3)]
        return (lambda: nsa_attn(q, k, v, kc, vc, *g, cmp_block=cb, cmp_stride=cs,
                                 gates_nonneg=True)), (q, k, v, kc, vc, *g)
    raise ValueError(f"unknown case {name!r}; cases: {', '.join(CASES)}")
