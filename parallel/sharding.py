"""Token layouts for context parallelism: which global tokens each member of a sequence group holds.

A micro-batch [B, T] is first flattened to one sequence of B·T tokens whose `cu_seqlens`
(always present under CP) mark every row start, so rows never see each other; that sequence
is then cut into equal chunks:
- contiguous: cp chunks, rank r holds chunk r;
- zigzag: 2·cp chunks, rank r holds chunks r and 2·cp−1−r, so causal attention costs every rank
  the same (early chunks see few keys, late chunks many).
Inputs, labels, positions are selected with the same indices; cu_seqlens stay global.

The strategies (allgather, lasp, ring) run over a *sequence group* (`SeqGroup`) described by a
`Placement`: member i holds the chunk ids `members[i]`, increasing, out of `n_chunks` equal
chunks. The cp group with its layout is one placement; under a Ulysses degree u the outer group
is another (`Placement.grouped(u)`: member o holds the chunks of cp ranks o·u … o·u+u−1).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

LAYOUTS = ("zigzag", "contiguous")


@dataclass(frozen=True)
class Placement:
    """`members[i]`: the chunk ids member i holds (increasing, so its local token order is the
    sequence order) out of `n_chunks` equal consecutive chunks; `label` names the config rule
    the chunk count comes from, for error messages."""
    n_chunks: int
    members: tuple
    label: str = ""

    def __post_init__(self):
        held = sorted(c for m in self.members for c in m)
        if held != list(range(self.n_chunks)) or any(list(m) != sorted(m) for m in self.members) \
                or len({len(m) for m in self.members}) != 1:
            raise ValueError(f"placement {self.members} must split {self.n_chunks} chunks evenly, "
                             "each member's ids increasing")

    @property
    def size(self) -> int:
        return len(self.members)

    def chunk_len(self, total: int) -> int:
        if total % self.n_chunks:
            raise ValueError(f"tokens per micro-batch ({total}) must be divisible by "
                             f"{self.label or self.n_chunks}")
        return total // self.n_chunks

    def bounds(self, total: int, member: int) -> list[tuple[int, int]]:
        """[(start, end)] of the global token ranges `member` holds, in storage order."""
        size = self.chunk_len(total)
        return [(c * size, (c + 1) * size) for c in self.members[member]]

    def indices(self, total: int, member: int, device=None) -> torch.Tensor:
        return torch.cat([torch.arange(s, e, device=device) for s, e in self.bounds(total, member)])

    def order(self, total: int, device=None) -> torch.Tensor:
        """Global index of each position of the member-ordered concatenation of all shards (what
        an all-gather over the group returns); its argsort restores sequence order."""
        return torch.cat([self.indices(total, m, device) for m in range(self.size)])

    def grouped(self, u: int) -> "Placement":
        """Members o·u … o·u+u−1 merged into member o (their chunks, increasing)."""
        assert u >= 1 and self.size % u == 0, (u, self.size)  # CPSettings checked cp.ulysses
        merged = tuple(tuple(sorted(c for m in self.members[o * u:(o + 1) * u] for c in m))
                       for o in range(self.size // u))
        return Placement(self.n_chunks, merged, self.label)


@dataclass
class SeqGroup:
    """What a strategy runs over: the placement, this process's member index and the process
    group of the members (None when there is one member)."""
    placement: Placement
    rank: int = 0
    group: object = None

    @property
    def size(self) -> int:
        return self.placement.size

    def bounds(self, total: int) -> list[tuple[int, int]]:
        return self.placement.bounds(total, self.rank)


def layout_placement(cp: int, layout: str) -> Placement:
    """The cp group's placement (a layout CPSettings accepted): zigzag, rank r holds chunks r
    and 2·cp−1−r of 2·cp; contiguous, chunk r of cp."""
    if layout == "zigzag":
        return Placement(2 * cp, tuple((r, 2 * cp - 1 - r) for r in range(cp)),
                         f"2·cp.size = {2 * cp} (zigzag layout)")
    assert layout == "contiguous", layout
    return Placement(cp, tuple((r,) for r in range(cp)), f"cp.size = {cp} (contiguous layout)")


def chunk_bounds(total: int, cp: int, rank: int, layout: str) -> list[tuple[int, int]]:
    """[(start, end)] of the global token ranges held by `rank`, in the order they are stored."""
    return layout_placement(cp, layout).bounds(total, rank)


def local_indices(total: int, cp: int, rank: int, layout: str, device=None) -> torch.Tensor:
    return layout_placement(cp, layout).indices(total, rank, device)


def gather_order(total: int, cp: int, layout: str, device=None) -> torch.Tensor:
    """Global index of each position of the rank-ordered concatenation of all shards (what an
    all-gather returns); its argsort restores sequence order."""
    return layout_placement(cp, layout).order(total, device)


def flatten_rows(mb: dict) -> dict:
    """[B, T] micro-batch -> one sequence [1, B·T] whose cu_seqlens include every row start."""
    B, T = mb["input_ids"].shape
    cu = mb.get("cu_seqlens")
    rows = torch.arange(0, B * T + 1, T, dtype=torch.int32)
    cu = rows if cu is None else torch.unique(torch.cat([cu.to(torch.int32), rows]))
    out = {k: mb[k].reshape(1, B * T) for k in ("input_ids", "labels", "positions")}
    out["cu_seqlens"] = cu.to(torch.int32)
    return out


def shard_batch(mb: dict, cp: int, cp_rank: int, layout: str) -> dict:
    """This rank's part of a micro-batch for context parallelism (cu_seqlens stay global)."""
    flat = flatten_rows(mb)
    total = flat["input_ids"].shape[1]
    idx = local_indices(total, cp, cp_rank, layout)
    out = {k: flat[k][:, idx].contiguous() for k in ("input_ids", "labels", "positions")}
    out["cu_seqlens"] = flat["cu_seqlens"]
    return out
