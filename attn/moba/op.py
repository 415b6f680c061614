"""Public MoBA op. Only the reference path exists so far: the Triton kernels (gating, top-k and
block-sparse attention without T×T masks) are issue 5's remaining work, so on any device this
runs attn/moba/ref.py with dense O(Tq·Tk) masks — fine on CPU and for short sequences; at long
context on a GPU it is the memory of full attention scores, and a warning says so once."""
from __future__ import annotations

import warnings

import torch

from attn.moba.ref import moba_attn_ref

_warned = False


def _check(q, k, v, block_size, topk, q_offset):
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4 or q.shape[0] != k.shape[0] \
            or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: expected "
                         "q [B, Tq, Hq, D] and k, v [B, Tk, Hkv, D]")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"Hq={q.shape[2]} must be a multiple of Hkv={k.shape[2]}")
    if not 1 <= block_size:
        raise ValueError(f"block_size={block_size} must be >= 1")
    if not 1 <= topk:
        raise ValueError(f"topk={topk} must be >= 1 (it counts the query's own block)")
    if q_offset < 0 or q_offset + q.shape[1] > k.shape[1]:
        raise ValueError(f"q_offset={q_offset} with Tq={q.shape[1]} needs 0 <= q_offset and "
                         f"q_offset+Tq <= Tk={k.shape[1]}")


def moba_attn(q, k, v, *, block_size: int = 512, topk: int = 3, scale=None, cu_seqlens=None,
              q_offset: int = 0):
    """MoBA attention, [B, T, H, D] layout (see ref.py for the definition); differentiable."""
    global _warned
    _check(q, k, v, block_size, topk, q_offset)
    if q.is_cuda and not _warned:
        _warned = True
        warnings.warn("attn=moba runs its dense reference path (no Triton kernel yet): "
                      "O(T^2) memory per head")
    return moba_attn_ref(q, k, v, block_size=block_size, topk=topk, scale=scale,
                         cu_seqlens=cu_seqlens, q_offset=q_offset)
