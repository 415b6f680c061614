"""Plain-PyTorch causal softmax attention: the definition, the test oracle and the CPU path.

Dense O(Tq·Tk) scores: for tests and short CPU runs only. Computes in fp32 (float64 when given
float64); autograd through it gives the reference gradients.
"""
from __future__ import annotations

import torch

from attn.common.checks import check_cu_seqlens
from attn.masks import causal_mask


def _visible(tq, tk, q_offset, cu_seqlens, window, causal, device):
    """[tq, tk] bool: the contract's mask, or everything for a non-causal (off-diagonal) block."""
    if causal:
        return causal_mask(tq, tk, q_offset, cu_seqlens, window, device=device)
    return torch.ones(tq, tk, dtype=torch.bool, device=device)


def flash_attn_ref(q, k, v, *, scale=None, cu_seqlens=None, q_offset: int = 0, window=None,
                   causal: bool = True):
    """(o, lse): o [B, Tq, Hq, D] in q's dtype, lse [B, Hq, Tq] natural log, fp32 (float64 for
    float64 inputs). Query i sits at absolute position q_offset + i; keys at 0..Tk-1;
    cu_seqlens (B == 1) describes the key sequence. causal=False (the CP primitives' off-diagonal
    blocks): every query sees every key; no documents, window or offset then."""
    B, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, B, tk)
    mask = _visible(tq, tk, q_offset, cu_seqlens, window, causal, q.device)
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    g = hq // hkv
    qf = q.to(ct).transpose(1, 2)                                   # [B, Hq, Tq, D]
    kf = k.to(ct).transpose(1, 2).repeat_interleave(g, dim=1)       # [B, Hq, Tk, D]
    vf = v.to(ct).transpose(1, 2).repeat_interleave(g, dim=1)
    s = (qf @ kf.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)                                # [B, Hq, Tq]
    p = torch.exp(s - lse[..., None])
    o = (p @ vf).transpose(1, 2).to(q.dtype)
    return o, lse if ct == torch.float64 else lse.float()


def flash_bwd_ref(do, q, k, v, o, lse, *, scale=None, cu_seqlens=None, q_offset: int = 0,
                  window=None, causal: bool = True):
    """(dq, dk, dv) from the given o and lse, as the kernels compute them:
    P = exp(S − lse), dV = Pᵀ dO, dS = P ⊙ (dO Vᵀ − rowsum(dO ⊙ O)), dQ = scale·dS K,
    dK = scale·dSᵀ Q (summed over each GQA group). With the o, lse of the same call this is
    the gradient of flash_attn_ref; with a merged o, lse (ring attention) it is the block's share
    of the gradient of the whole softmax."""
    B, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    mask = _visible(tq, tk, q_offset, cu_seqlens, window, causal, q.device)
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    g = hq // hkv
    qf, dof, of = (t.to(ct).transpose(1, 2) for t in (q, do, o))    # [B, Hq, Tq, D]
    kf = k.to(ct).transpose(1, 2).repeat_interleave(g, dim=1)       # [B, Hq, Tk, D]
    vf = v.to(ct).transpose(1, 2).repeat_interleave(g, dim=1)
    s = (qf @ kf.transpose(-1, -2)) * scale
    p = torch.exp(s - lse.to(ct)[..., None]).masked_fill(~mask, 0.0)
    dv = p.transpose(-1, -2) @ dof
    delta = (dof * of).sum(-1, keepdim=True)
    ds = p * (dof @ vf.transpose(-1, -2) - delta)
    dq = (ds @ kf) * scale
    dk = (ds.transpose(-1, -2) @ qf) * scale

    def per_kv_head(t):  # [B, Hq, Tk, D] -> [B, Tk, Hkv, D], summing each group
        return t.reshape(B, hkv, g, tk, d).sum(2).transpose(1, 2)
    return (dq.transpose(1, 2).to(q.dtype), per_kv_head(dk).to(k.dtype),
            per_kv_head(dv).to(v.dtype))
