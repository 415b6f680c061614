"""Mixture of Block Attention (MoBA): the definition, the test oracle and the CPU path.

Keys are cut into blocks of `block_size` from each document's start. A query at absolute
position p (query i sits at q_offset + i) in block b always attends to its own block's keys
up to itself (b·block_size ≤ s ≤ p, causal). Every earlier block j < b of its document is scored
by q · mean(k[block j]) (earlier blocks are always complete); the `topk − 1` best are attended in
full. One softmax runs over the union. Routing is per query head: the heads of a GQA group share
K/V but choose their own blocks. With fewer earlier blocks than topk − 1 all are taken, which
is full causal attention.

Dense masks: O(Tq·Tk) memory, for tests and short CPU runs only.
"""
from __future__ import annotations

import torch

from attn.common.checks import check_cu_seqlens
from attn.masks import document_ids


def _doc_starts(cu_seqlens, tk: int, device) -> torch.Tensor:
    """Start position of the document of every key position ([tk], int64)."""
    if cu_seqlens is None:
        return torch.zeros(tk, dtype=torch.long, device=device)
    cu = cu_seqlens.to(device).long()
    return cu[document_ids(cu_seqlens.to(device), tk)]


def moba_mask(q, k, *, block_size: int, topk: int, cu_seqlens=None, q_offset: int = 0):
    """Boolean [B, Hq, Tq, Tk]: True where a query attends a key under MoBA routing."""
    B, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    dev = q.device
    start = _doc_starts(cu_seqlens, tk, dev)                   # [Tk]
    kpos = torch.arange(tk, device=dev)
    kblk = (kpos - start) // block_size                        # doc-relative block of each key
    qpos = torch.arange(tq, device=dev) + q_offset
    qblk = kblk[qpos]                                          # [Tq]
    same_doc = start[None, :] == start[qpos][:, None]          # [Tq, Tk]
    causal = kpos[None, :] <= qpos[:, None]
    own = same_doc & causal & (kblk[None, :] == qblk[:, None])

    # block ids global over the sequence: (document start, doc-relative block) -> one index
    gid = torch.unique(start * (tk + 1) + kblk, return_inverse=True)[1]  # [Tk]
    n_blocks = int(gid.max()) + 1
    onehot = torch.zeros(n_blocks, tk, dtype=torch.float64, device=dev)
    onehot[gid, kpos] = 1.0
    mean_k = torch.einsum("nt,bthd->bnhd", onehot / onehot.sum(1, keepdim=True),
                          k.double())                          # [B, n_blocks, Hkv, D]
    g = hq // hkv
    mean_k = mean_k.repeat_interleave(g, dim=2)                # [B, n_blocks, Hq, D]
    scores = torch.einsum("bqhd,bnhd->bhqn", q.double(), mean_k)
    # candidate blocks of a query: earlier blocks of its own document
    blk_start = torch.zeros(n_blocks, dtype=torch.long, device=dev).scatter_reduce(
        0, gid, kpos, reduce="amin", include_self=False)
    blk_doc = start[blk_start]
    blk_rel = kblk[blk_start]
    cand = (blk_doc[None, :] == start[qpos][:, None]) & (blk_rel[None, :] < qblk[:, None])
    scores = scores.masked_fill(~cand, float("-inf"))
    n_pick = min(max(topk - 1, 0), n_blocks)
    chosen = torch.zeros(B, hq, tq, n_blocks, dtype=torch.bool, device=dev)
    if n_pick > 0:
        idx = scores.topk(n_pick, dim=-1).indices
        chosen.scatter_(-1, idx, True)
        chosen &= cand                                         # -inf picks (too few blocks)
    picked = chosen.gather(-1, gid[None, None, None, :].expand(B, hq, tq, tk))
    return own[None, None] | picked


def moba_attn_ref(q, k, v, *, block_size: int = 512, topk: int = 3, scale=None,
                  cu_seqlens=None, q_offset: int = 0):
    """MoBA output [B, Tq, Hq, D] in q's dtype (fp32 math, float64 for float64 inputs)."""
    B, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, B, tk)
    scale = d ** -0.5 if scale is None else scale
    mask = moba_mask(q, k, block_size=block_size, topk=topk, cu_seqlens=cu_seqlens,
                     q_offset=q_offset)
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    g = hq // hkv
    qf = q.to(ct).transpose(1, 2)
    kf = k.to(ct).transpose(1, 2).repeat_interleave(g, dim=1)
    vf = v.to(ct).transpose(1, 2).repeat_interleave(g, dim=1)
    s = (qf @ kf.transpose(-1, -2)) * scale
    p = s.masked_fill(~mask, float("-inf")).softmax(-1)
    return (p @ vf).transpose(1, 2).to(q.dtype)
