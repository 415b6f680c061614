"""`allgather` context parallelism for softmax and block-sparse families (sdpa, flash, moba, nsa).

Every rank all-gathers K/V of the whole sequence (cheap under GQA: Hkv ≪ Hq), then runs the
family's own op for each of its query chunks at its absolute position (`q_offset`), against the
keys up to the chunk's end (later keys are masked by causality anyway). Sparse families thus
gate and select blocks for their own queries only ("sparsity per shard"). The gather's backward
reduce-scatters dK/dV. Documents come for free: cu_seqlens are global and the op masks them.

It runs over a sequence group (parallel/sharding.py `SeqGroup`): the cp group, or under a
Ulysses degree u the outer group of cp/u members, each holding the chunks of u cp ranks for
Hkv/u heads.

Bytes per layer and rank: all-gather of K and V, 2·(n−1)/n·T·Hkv·D elements in forward (n the
group's size: cp, or cp/u with T·Hkv/u per rank under Ulysses), the same reduce-scattered in
backward.
"""
from __future__ import annotations

import torch

from parallel.comm import gather_seq
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

    def cp_attend(q, k, v, cu_seqlens=None, **kwargs):
        total = int(cu_seqlens[-1])
        k_all = gather_sequence(k, seq.group, total, seq.placement)
        v_all = gather_sequence(v, seq.group, total, seq.placement)
        outs, at = [], 0
        for start, end in seq.bounds(total):
            n = end - start
            outs.append(attend(q[:, at:at + n], k_all[:, :end], v_all[:, :end],
                               clip_cu_seqlens(cu_seqlens, end), q_offset=start, **kwargs))
            at += n
        return torch.cat(outs, dim=1)

    return cp_attend
