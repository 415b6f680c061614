"""The dp × cp process mesh, with an optional Ulysses degree u inside cp (2-D context parallelism).

Ranks are laid out cp-fastest: rank = dp_rank · cp + cp_rank, so a context-parallel group is a
run of consecutive ranks (one node, NVLink) and data-parallel peers are cp apart. Inside cp,
cp_rank = outer_rank · u + uly_rank: a Ulysses subgroup is u consecutive cp ranks (its
all-to-alls stay inside a node), an outer group the cp/u ranks with the same uly_rank (the
family's strategy runs over it, across nodes). Every rank takes part in every new_group call,
as torch.distributed requires; a subgroup equal to the cp group reuses it, so u = 1 (or u = cp)
creates no extra group.
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
    ulysses: int = 1          # Ulysses degree u inside cp
    uly_rank: int = 0         # cp_rank % u: this rank's head group
    outer_rank: int = 0       # cp_rank // u: this rank's member index in its outer group
    uly_group: object = None  # the u consecutive cp ranks of this rank's subgroup (None if u == 1)
    outer_group: object = None  # the cp/u cp ranks with this uly_rank (None if cp/u == 1)

    @property
    def outer(self) -> int:
        """Size of the outer group (cp / u)."""
        return self.cp // self.ulysses


def build_mesh(info: DistInfo, cp: int, ulysses: int = 1) -> Mesh:
    if cp < 1 or info.world % cp:
        raise ValueError(f"parallel.cp={cp} must be >= 1 and divide the number of processes "
                         f"({info.world})")
    if ulysses < 1 or cp % ulysses:
        raise ValueError(f"parallel.ulysses={ulysses} must be >= 1 and divide parallel.cp={cp}")
    dp, u = info.world // cp, ulysses
    mesh = Mesh(info.rank, info.world, dp, cp, info.rank // cp, info.rank % cp)
    mesh.ulysses, mesh.uly_rank, mesh.outer_rank = u, mesh.cp_rank % u, mesh.cp_rank // u
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
    outer = cp // u
    mesh.uly_group = mesh.cp_group if u == cp else None
    mesh.outer_group = mesh.cp_group if outer == cp else None
    if 1 < u < cp:
        for d in range(dp):
            for o in range(outer):  # Ulysses subgroups: u consecutive cp ranks
                g = dist.new_group([d * cp + o * u + j for j in range(u)])
                if (d, o) == (mesh.dp_rank, mesh.outer_rank):
                    mesh.uly_group = g
        for d in range(dp):
            for j in range(u):      # outer groups: same uly_rank, u apart
                g = dist.new_group([d * cp + o * u + j for o in range(outer)])
                if (d, j) == (mesh.dp_rank, mesh.uly_rank):
                    mesh.outer_group = g
    return mesh
