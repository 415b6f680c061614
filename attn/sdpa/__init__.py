"""`attn=sdpa`: softmax attention through torch's scaled_dot_product_attention (baseline).

On CUDA, torch dispatches to its FlashAttention-2 / cuDNN / memory-efficient kernels when the
call is plain causal; documents and q_offset fall back to a per-document loop (no dense mask)
or, for q_offset, an explicit boolean mask.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from attn.base import SoftmaxAttention
from attn.masks import causal_mask, check_cu_seqlens


def _sdpa(q, k, v, scale, is_causal=False, mask=None):
    # torch wants [B, H, T, D]; GQA via enable_gqa (no repeated K/V in memory)
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
        is_causal=is_causal, scale=scale, enable_gqa=q.shape[2] != k.shape[2])
    return o.transpose(1, 2)


def sdpa_attn(q, k, v, *, scale=None, cu_seqlens=None, q_offset: int = 0, window=None):
    """Causal softmax attention, [B, T, H, D] layout, per the contract in DESIGN.md."""
    if q.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: expected "
                         "q [B, Tq, Hq, D] and k, v [B, Tk, Hkv, D]")
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"Hq={q.shape[2]} must be a multiple of Hkv={k.shape[2]}")
    B, tq, _, D = q.shape
    tk = k.shape[1]
    scale = D ** -0.5 if scale is None else scale
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, B, tk)
    if cu_seqlens is None and window is None and q_offset == 0 and tq == tk:
        return _sdpa(q, k, v, scale, is_causal=True)
    if cu_seqlens is not None and window is None and q_offset == 0 and tq == tk:
        # one causal call per document: no O(T^2) mask, fast kernels stay eligible
        bounds = cu_seqlens.tolist()
        outs = [_sdpa(q[:, s:e], k[:, s:e], v[:, s:e], scale, is_causal=True)
                for s, e in zip(bounds[:-1], bounds[1:]) if e > s]
        return torch.cat(outs, dim=1)
    mask = causal_mask(tq, tk, q_offset, cu_seqlens, window, device=q.device)
    return _sdpa(q, k, v, scale, mask=mask)


class SDPACore(SoftmaxAttention):
    """Softmax attention layer whose op is torch SDPA."""

    family = "sdpa"

    def attend(self, q, k, v, cu_seqlens=None, *, q_offset=0, heads=None):
        return sdpa_attn(q, k, v, scale=self.scale, cu_seqlens=cu_seqlens, q_offset=q_offset)


__all__ = ["sdpa_attn", "SDPACore"]
