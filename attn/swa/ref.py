"""Reference of sliding-window causal softmax attention: the definition, test oracle, CPU path.

Query t (absolute position q_offset + i) attends keys s with t - window < s <= t in its own
document; o_t = softmax(scale · q_t·k_s) v_s over them (every query sees at least itself).
Plain PyTorch on a dense boolean mask, computed in float32 (float64 for float64 inputs):
O(Tq·Tk) memory, for tests and short CPU runs.
"""
from __future__ import annotations

import torch

from attn.masks import causal_mask


def swa_attn_ref(q, k, v, *, window: int, scale=None, cu_seqlens=None, q_offset: int = 0):
    """q [B, Tq, Hq, D], k/v [B, Tk, Hkv, D] (Hq a multiple of Hkv) -> o like q."""
    B, tq, hq, D = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf = q.to(cd).transpose(1, 2)                                           # [B, Hq, Tq, D]
    kf, vf = (t.to(cd).repeat_interleave(hq // hkv, dim=2).transpose(1, 2) for t in (k, v))
    visible = causal_mask(tq, tk, q_offset, cu_seqlens, window, device=q.device)
    scores = (qf @ kf.transpose(-1, -2)) * scale
    p = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return (p @ vf).transpose(1, 2).to(q.dtype)
