"""`ulysses` context parallelism (DeepSpeed-Ulysses) for any family.

An all-to-all turns sequence-sharded q/k/v [1, T/cp, H, D] into head-sharded [1, T, H/cp, D];
each rank runs the family's op on the whole sequence for its heads (passing `heads=` so cores
with per-head parameters, such as Lightning's decay slopes, pick theirs); a second all-to-all
returns the output to sequence sharding. Needs n_heads and n_kv_heads divisible by cp.

Bytes per layer and rank: 4 all-to-alls of (cp−1)/cp of the local q, k, v, o in forward, the
same in backward; independent of the family's cost, so it suits every one.
"""
from __future__ import annotations

import torch

from parallel.comm import heads_to_seq, seq_to_heads
from parallel.sharding import gather_order


def check_ulysses_heads(n_heads: int, n_kv_heads: int, cp: int, where: str) -> None:
    if n_heads % cp or n_kv_heads % cp:
        raise ValueError(f"parallel.cp_strategy=ulysses needs model.n_heads={n_heads} and "
                         f"model.n_kv_heads={n_kv_heads} divisible by parallel.cp={cp} ({where})")


def make_ulysses_attend(attend, mesh, layout: str, n_heads: int):
    heads_per_rank = n_heads // mesh.cp
    my_heads = slice(mesh.cp_rank * heads_per_rank, (mesh.cp_rank + 1) * heads_per_rank)

    def cp_attend(q, k, v, cu_seqlens=None, **kwargs):
        total = int(cu_seqlens[-1])
        order = gather_order(total, mesh.cp, layout, device=q.device)  # rank order -> global index
        restore = torch.argsort(order)
        qh, kh, vh = (seq_to_heads(t, mesh.cp_group).index_select(1, restore) for t in (q, k, v))
        o = attend(qh, kh, vh, cu_seqlens, heads=my_heads, **kwargs)
        return heads_to_seq(o.index_select(1, order), mesh.cp_group)

    return cp_attend
