"""`ring` context parallelism for cores with softmax block primitives (`lse_blocks`): K/V travel
around the ring.

Each of the cp steps computes this rank's queries against the K/V block it holds, while the
block moves on to the next rank (`batch_isend_irecv`, asynchronous on NCCL's own stream, so the
transfer overlaps the block's compute). Partial outputs merge through their log-sum-exps in
fp32 with the stable sigmoid form
    o ← o − σ(lse_b − lse)·(o − o_b),   lse ← lse − log σ(lse − lse_b).
With zigzag (rank r holds chunks r and 2cp−1−r) every step after the first costs every rank
the same N × N/2 block: from an earlier rank both query halves see the first key half; from a
later rank the second query half sees both key halves. Backward sends the blocks around again,
each with its fp32 dK/dV accumulator, which arrives home after the last hop.

The schedule is derived from the group's placement (parallel/sharding.py: each member holds
increasing chunk ids), so it also runs over the outer group of a Ulysses degree u (member o
holds the 2u chunks of cp ranks o·u … o·u+u−1, H/u heads): per (query chunk, key chunk) an
earlier key chunk is a full block, the same chunk a causal one, a later one is skipped; query
chunks seeing the same prefix of the visiting block's chunks share one call. Bytes per layer
and rank: (n−1) hops of the local K and V (n the group's size), twice that in backward.

Needs one document per micro-batch (rows would need document masks across blocks): packed
documents use `allgather`. Block primitives: the core's `lse_blocks()` (fwd, bwd) with `causal`.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _blocks(placement, me: int, src: int, size: int):
    """(query slice, key slice, causal) of member `me`'s work against the block of member `src`,
    for chunks of `size` tokens. Each member's chunk ids increase, so its own block is causal as
    one sequence, and each query chunk sees a prefix of `src`'s chunks (those before it)."""
    mine, theirs = placement.members[me], placement.members[src]
    if src == me:
        every = slice(0, len(mine) * size)
        return [(every, every, True)]
    seen = [sum(c < q for c in theirs) for q in mine]       # nondecreasing along `mine`
    out, i = [], 0
    while i < len(mine):
        j = i
        while j + 1 < len(mine) and seen[j + 1] == seen[i]:
            j += 1
        if seen[i]:
            out.append((slice(i * size, (j + 1) * size), slice(0, seen[i] * size), False))
        i = j + 1
    return out


def _pass_on(tensor: torch.Tensor, group, cp: int, rank: int):
    """Start sending `tensor` to the next member and receiving the previous member's; returns
    (requests, receive buffer)."""
    buf = torch.empty_like(tensor)
    nxt = dist.get_global_rank(group, (rank + 1) % cp)
    prv = dist.get_global_rank(group, (rank - 1) % cp)
    ops = [dist.P2POp(dist.isend, tensor.contiguous(), nxt, group),
           dist.P2POp(dist.irecv, buf, prv, group)]
    return dist.batch_isend_irecv(ops), buf


def _merge(o, lse, rows, o_b, lse_b):
    """Fold a partial (o_b [B, n, H, D], lse_b [B, H, n]) into rows of the accumulators."""
    lse_r = lse[:, :, rows]
    weight = torch.sigmoid(lse_b - lse_r).transpose(1, 2)[..., None]     # [B, n, H, 1]
    o[:, rows] = o[:, rows] - weight * (o[:, rows] - o_b.float())
    lse[:, :, rows] = lse_r - F.logsigmoid(lse_r - lse_b)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, seq, block_fwd, block_bwd):
        cp, rank, group = seq.size, seq.rank, seq.group
        B, t, hq, _ = q.shape
        size = t // len(seq.placement.members[rank])
        o = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full((B, hq, t), float("-inf"), dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v])
        for step in range(cp):
            src = (rank - step) % cp
            reqs, nxt = _pass_on(kv, group, cp, rank) if step < cp - 1 else ([], None)
            for rows, cols, causal in _blocks(seq.placement, rank, src, size):
                o_b, lse_b = block_fwd(q[:, rows], kv[0][:, cols], kv[1][:, cols], scale=scale,
                                       causal=causal)
                if step == 0:   # the diagonal block covers every row: initialise
                    o[:, rows], lse[:, :, rows] = o_b.float(), lse_b
                else:
                    _merge(o, lse, rows, o_b, lse_b)
            for r in reqs:
                r.wait()
            kv = nxt if nxt is not None else kv
        o = o.to(q.dtype)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale, ctx.seq, ctx.block_bwd = scale, seq, block_bwd
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        seq = ctx.seq
        cp, rank, group = seq.size, seq.rank, seq.group
        size = q.shape[1] // len(seq.placement.members[rank])
        do = do.contiguous()
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v])
        dkv = torch.zeros(kv.shape, dtype=torch.float32, device=q.device)
        for step in range(cp):
            src = (rank - step) % cp
            reqs, nxt = _pass_on(kv, group, cp, rank) if step < cp - 1 else ([], None)
            for rows, cols, causal in _blocks(seq.placement, rank, src, size):
                dq_b, dk_b, dv_b = ctx.block_bwd(do[:, rows], q[:, rows], kv[0][:, cols], kv[1][:, cols],
                                             o[:, rows], lse[:, :, rows].contiguous(),
                                             scale=ctx.scale, causal=causal)
                dq[:, rows] += dq_b.float()
                dkv[0][:, cols] += dk_b.float()
                dkv[1][:, cols] += dv_b.float()
            # the accumulator travels with its block; after the last hop it is home
            dreqs, dnxt = _pass_on(dkv, group, cp, rank)
            for r in reqs + dreqs:
                r.wait()
            kv = nxt if nxt is not None else kv
            dkv = dnxt
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None


def make_ring_attend(seq, scale: float, block_fwd, block_bwd):
    """Ring attention over the sequence group `seq` (parallel/sharding.py SeqGroup) with a
    core's softmax block primitives (attn/base.py `lse_blocks`)."""
    def cp_attend(q, k, v, cu_seqlens=None, **kwargs):
        if cu_seqlens is not None and cu_seqlens.numel() > 2:
            raise ValueError("cp.strategy=ring needs one document per micro-batch "
                             "(trainer.micro_batch=1, data.document_mask=false); packed documents "
                             "use cp.strategy=allgather")
        return _RingAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), scale, seq,
                                    block_fwd, block_bwd)

    return cp_attend
