"""`allgather` context parallelism for cores declaring `gather_kv` or `lse_blocks`.

Every rank all-gathers K/V of the whole sequence (cheap under GQA: Hkv ≪ Hq), then runs the
core's own op (`gather_kv`) for each of its query chunks at its absolute position (`q_offset`),
against the keys up to the chunk's end (later keys are masked by causality anyway), with the
chunk's rows of any per-query inputs (NSA's gates). Sparse families thus gate and select blocks
for their own queries only ("sparsity per shard"). The gather's backward reduce-scatters dK/dV.
Documents come for free: cu_seqlens are global and the op masks them.

It runs over a sequence group (parallel/sharding.py `SeqGroup`): the cp group, or under a
Ulysses degree u the outer group of cp/u members, each holding the chunks of u cp ranks for
Hkv/u heads.

Bytes per layer and rank: all-gather of K and V, 2·(n−1)/n·T·Hkv·D elements in forward (n the
group's size: cp, or cp/u with T·Hkv/u per rank under Ulysses), the same reduce-scattered in
backward.

Cores with softmax block primitives (`lse_blocks`, e.g. flash) overlap the collectives with
compute (`_OverlappedAllGather`):
the K/V all-gather is started asynchronously and each local query chunk [s, e) first attends
its own keys [s, e) (causal, documents from cu_seqlens shifted to the chunk: no gathered key is
needed); after the wait it attends the earlier keys of the document holding s, [doc_start(s), s),
for its rows up to the next document start (the only rows that can see keys before s), and the
two partials merge through their lse (parallel/ring.py's stable form). Backward computes the
gathered-key part first, starts the reduce-scatter of its dK/dV asynchronously, then the
local part (whose dK/dV stays on the rank). Overlap condition per layer: the own-chunk block,
T²/(2n²)·Hq·D·4 FLOPs per chunk, against 2·(n−1)/n·T·Hkv·D·bytes moved (docs/context_parallel.md).
"""
from __future__ import annotations

import torch

from parallel.comm import _all_gather, _reduce_scatter, gather_seq
from parallel.lasp import local_cu_seqlens
from parallel.ring import _merge
from parallel.sharding import Placement, SeqGroup


def clip_cu_seqlens(cu: torch.Tensor, end: int) -> torch.Tensor:
    """Document boundaries of the prefix [0, end) of the sequence."""
    inside = cu[cu < end]
    return torch.cat([inside, inside.new_tensor([end])])


def gather_sequence(x: torch.Tensor, group, total: int, placement: Placement) -> torch.Tensor:
    """Differentiable all-gather of a [1, T_loc, ...] shard, returned in sequence order."""
    restore = torch.argsort(placement.order(total, device=x.device))
    return gather_seq(x, group).index_select(1, restore)


def make_allgather_attend(attend, seq: SeqGroup):
    """Wrap a core's `attend(q, k, v, cu_seqlens, q_offset=...)` for the sequence group `seq`."""

    def cp_attend(q, k, v, cu_seqlens=None, *, heads=None, **query_inputs):
        total = int(cu_seqlens[-1])
        k_all = gather_sequence(k, seq.group, total, seq.placement)
        v_all = gather_sequence(v, seq.group, total, seq.placement)
        outs, at = [], 0
        for start, end in seq.bounds(total):
            rows = slice(at, at + end - start)
            extra = {name: t[:, rows] for name, t in query_inputs.items()}
            outs.append(attend(q[:, rows], k_all[:, :end], v_all[:, :end],
                               clip_cu_seqlens(cu_seqlens, end), q_offset=start, heads=heads,
                               **extra))
            at += end - start
        return torch.cat(outs, dim=1)

    return cp_attend


def _pieces(cu: torch.Tensor, bounds):
    """Per local chunk (s, e) at local rows [at, at+n): (s, e, at, n, cu_local, d0, b): keys
    [s, e) with the chunk's own document boundaries, and the earlier keys [d0, s) of the
    document holding s that its rows [s, b) see (d0 == s: none)."""
    cu_list = cu.tolist()
    out, at = [], 0
    for s, e in bounds:
        d0 = max(c for c in cu_list if c <= s)
        b = min([c for c in cu_list if c > s] + [e])
        out.append((s, e, at, e - s, local_cu_seqlens(cu, s, e), d0, b))
        at += e - s
    return out


class _OverlappedAllGather(torch.autograd.Function):
    """Softmax attention of the local query chunks against the all-gathered K/V, the gather
    overlapped with each chunk's own block and the dK/dV reduce-scatter with the local backward."""

    @staticmethod
    def forward(ctx, q, k, v, cu, scale, seq, block_fwd, block_bwd):
        total = int(cu[-1])
        n = seq.size
        kv = torch.stack([k, v])[:, 0].contiguous()                 # [2, T_loc, Hkv, D]
        gathered = kv.new_empty((2, n * kv.shape[1], *kv.shape[2:]))
        work = [_all_gather(gathered[i], kv[i], group=seq.group, async_op=True)
                for i in range(2)]
        pieces = _pieces(cu, seq.bounds(total))
        o = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.empty((1, q.shape[2], q.shape[1]), dtype=torch.float32, device=q.device)
        for s, e, at, m, cu_loc, _, _ in pieces:                    # own blocks, no comm needed
            rows = slice(at, at + m)
            o_b, lse_b = block_fwd(q[:, rows], k[:, rows], v[:, rows], scale=scale,
                                   cu_seqlens=cu_loc)
            o[:, rows], lse[:, :, rows] = o_b.float(), lse_b
        for w in work:
            w.wait()
        restore = torch.argsort(seq.placement.order(total, device=q.device))
        kv_all = gathered.index_select(1, restore)[:, None]         # [2, 1, T, Hkv, D]
        for s, e, at, m, _, d0, b in pieces:                        # earlier keys of s's document
            if d0 < s:
                rows = slice(at, at + b - s)
                o_b, lse_b = block_fwd(q[:, rows], kv_all[0][:, d0:s], kv_all[1][:, d0:s],
                                       scale=scale, causal=False)
                _merge(o, lse, rows, o_b, lse_b)
        o = o.to(q.dtype)
        ctx.save_for_backward(q, k, v, kv_all, o, lse, restore)
        ctx.scale, ctx.seq, ctx.pieces, ctx.block_bwd = scale, seq, pieces, block_bwd
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, kv_all, o, lse, restore = ctx.saved_tensors
        seq, scale = ctx.seq, ctx.scale
        do = do.contiguous()
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dkv_all = torch.zeros(kv_all.shape, dtype=torch.float32, device=q.device)
        for s, e, at, m, _, d0, b in ctx.pieces:                    # gathered keys first
            if d0 < s:
                rows = slice(at, at + b - s)
                dq_b, dk_b, dv_b = ctx.block_bwd(do[:, rows], q[:, rows], kv_all[0][:, d0:s],
                                             kv_all[1][:, d0:s], o[:, rows],
                                             lse[:, :, rows].contiguous(), scale=scale,
                                             causal=False)
                dq[:, rows] += dq_b.float()
                dkv_all[0][:, d0:s] += dk_b.float()
                dkv_all[1][:, d0:s] += dv_b.float()
        # back to the gather's member order, then each member receives the sum of its rows
        send = torch.empty_like(dkv_all[:, 0])
        send[:, restore] = dkv_all[:, 0]
        recv = send.new_empty((2, k.shape[1], *k.shape[2:]))
        work = [_reduce_scatter(recv[i], send[i].contiguous(), group=seq.group, async_op=True)
                for i in range(2)]
        dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
        for s, e, at, m, cu_loc, _, _ in ctx.pieces:                # own blocks meanwhile
            rows = slice(at, at + m)
            dq_b, dk_b, dv_b = ctx.block_bwd(do[:, rows], q[:, rows], k[:, rows], v[:, rows],
                                         o[:, rows], lse[:, :, rows].contiguous(), scale=scale,
                                         cu_seqlens=cu_loc)
            dq[:, rows] += dq_b.float()
            dk[:, rows] += dk_b.float()
            dv[:, rows] += dv_b.float()
        for w in work:
            w.wait()
        dk += recv[0][None]
        dv += recv[1][None]
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def make_softmax_allgather_attend(seq: SeqGroup, scale: float, block_fwd, block_bwd, *, whole):
    """`allgather` for cores with softmax block primitives (attn/base.py `lse_blocks`), the
    gather overlapped (see the module docstring); `whole`: the core's own attend, for a group of
    one member (Ulysses over the whole cp group)."""

    def cp_attend(q, k, v, cu_seqlens=None, **kwargs):
        if seq.group is None:
            return whole(q, k, v, cu_seqlens, **kwargs)
        return _OverlappedAllGather.apply(q.contiguous(), k.contiguous(), v.contiguous(),
                                          cu_seqlens, scale, seq, block_fwd, block_bwd)

    return cp_attend
