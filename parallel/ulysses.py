"""`ulysses` context parallelism (DeepSpeed-Ulysses) for cores declaring `head_parallel`, alone
or inside cp (USP).

An all-to-all over a Ulysses group of u ranks turns sequence-sharded q/k/v [1, T/cp, H, D]
into head-sharded [1, u·T/cp, H/u, D]: the tokens of the group's u ranks, the heads of this
rank's place in it. The result is put in increasing chunk order, the op runs on it for these
heads (passing `heads=` so cores with per-head parameters, such as Lightning's decay slopes,
pick theirs), and a second all-to-all returns the output to sequence sharding.

- `cp.strategy=ulysses` (or `cp.ulysses` = cp.size): the group is the whole cp
  group, u = cp, and the family's op runs directly on the whole sequence.
- `cp.ulysses=u` with 1 < u < cp (2-D context parallelism, "USP"): the cp group is split
  into cp/u Ulysses subgroups of u consecutive ranks; between the two all-to-alls the family's
  own strategy (allgather / lasp / ring) runs over the outer group of cp/u ranks with the same
  head slice, each holding the chunks of the u ranks of its subgroup
  (parallel/sharding.py `Placement.grouped`).
Needs n_heads and n_kv_heads divisible by u.

Bytes per layer and rank: 4 all-to-alls of (u−1)/u of the local q, k, v, o in forward, the
same in backward: 2·(T/cp)·D·(2·Hq + 2·Hkv)·(u−1)/u bytes (bf16) each way, independent of the
family's cost, so it suits every one; under USP add the outer strategy's bytes for a group of
cp/u ranks and H/u heads (docs/context_parallel.md).
"""
from __future__ import annotations

import torch

from parallel.comm import heads_to_seq, seq_to_heads
from parallel.sharding import Placement


def check_ulysses_heads(n_heads: int, n_kv_heads: int, degree: int, asks: str, where: str) -> None:
    """`asks` names the settings that ask for the degree."""
    if n_heads % degree or n_kv_heads % degree:
        raise ValueError(f"{asks} needs model.n_heads={n_heads} and model.n_kv_heads={n_kv_heads} "
                         f"divisible by the Ulysses degree {degree} ({where})")


def make_ulysses_attend(attend, group, degree: int, uly_rank: int, outer_rank: int,
                        base: Placement, n_heads: int):
    """Wrap `attend` (the core's op, or the outer strategy's wrapper) with the all-to-alls over
    `group`: the `degree` cp ranks outer_rank·degree … outer_rank·degree + degree − 1 of the
    placement `base`; this rank keeps query heads uly_rank·H/degree … (uly_rank + 1)·H/degree − 1.
    `attend` receives the tokens of `base.grouped(degree).members[outer_rank]` in sequence order
    (every token when degree = cp)."""
    per = n_heads // degree
    my_heads = slice(uly_rank * per, (uly_rank + 1) * per)
    ranks = range(outer_rank * degree, (outer_rank + 1) * degree)

    def cp_attend(q, k, v, cu_seqlens=None, **query_inputs):
        total = int(cu_seqlens[-1])
        # global index of each token as the all-to-all delivers them (rank order)
        arrived = torch.cat([base.indices(total, r, device=q.device) for r in ranks])
        to_held = torch.argsort(arrived)                   # -> increasing global index
        back = torch.argsort(to_held)
        qh, kh, vh = (seq_to_heads(t, group).index_select(1, to_held) for t in (q, k, v))
        # per-query inputs [B, T, Hq, ...] (NSA's gates) travel to head shards as q does
        extra = {name: seq_to_heads(t, group).index_select(1, to_held)
                 for name, t in query_inputs.items()}
        o = attend(qh, kh, vh, cu_seqlens, heads=my_heads, **extra)
        return heads_to_seq(o.index_select(1, back), group)

    return cp_attend
