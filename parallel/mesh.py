"""The dp × cp process mesh.

Ranks are laid out cp-fastest: rank = dp_rank · cp + cp_rank, so a context-parallel group is a
run of consecutive ranks (one node, NVLink) and data-parallel peers are cp apart. Every rank
takes part in every new_group call, as torch.distributed requires.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from parallel.dist import DistInfo


@dataclass
class Mesh:
    rank: int = 0
    world: int = 1
    dp: int = 1
    cp: int = 1
    dp_rank: int = 0
    cp_rank: int = 0
    cp_group: object = None   # ProcessGroup of this rank's context-parallel peers (None if cp == 1)
    dp_group: object = None   # ProcessGroup of this rank's data-parallel peers (None if dp == 1)


def build_mesh(info: DistInfo, cp: int) -> Mesh:
    if cp < 1 or info.world % cp:
        raise ValueError(f"parallel.cp={cp} must be >= 1 and divide the number of processes "
                         f"({info.world})")
    dp = info.world // cp
    mesh = Mesh(info.rank, info.world, dp, cp, info.rank // cp, info.rank % cp)
    if cp > 1:
        for d in range(dp):
            g = dist.new_group(list(range(d * cp, (d + 1) * cp)))
            if d == mesh.dp_rank:
                mesh.cp_group = g
    if dp > 1 and cp > 1:
        for c in range(cp):
            g = dist.new_group(list(range(c, info.world, cp)))
            if c == mesh.cp_rank:
                mesh.dp_group = g
    return mesh
