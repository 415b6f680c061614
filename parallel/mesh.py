"""The dp × cp process mesh, with an optional Ulysses degree u inside cp (2-D context parallelism).

Built once per run (train.py, before the data: the data-parallel rank picks the batches) with
torch's `init_device_mesh` over named dimensions ("dp", "cp_outer", "cp_inner") of sizes
(dp, cp/u, u); "cp" is the flattened (cp_outer, cp_inner). Ranks are laid out cp-fastest:
rank = dp_rank · cp + cp_rank, so a context-parallel group is a run of consecutive ranks (one
node, NVLink) and data-parallel peers are cp apart. Inside cp, cp_rank = outer_rank · u +
uly_rank: a Ulysses subgroup is u consecutive cp ranks (its all-to-alls stay inside a node), an
outer group the cp/u ranks with the same uly_rank (the family's strategy runs over it, across
nodes). The settings are validated before (parallel/context.py `CPSettings`).
"""
from __future__ import annotations

from dataclasses import dataclass

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
    device_mesh: object = None  # torch's DeviceMesh ("dp", "cp_outer", "cp_inner"), world > 1

    @property
    def outer(self) -> int:
        """Size of the outer group (cp / u)."""
        return self.cp // self.ulysses


def build_mesh(info: DistInfo, cp: int = 1, ulysses: int = 1, device_type: str = "cpu") -> Mesh:
    """The mesh of `info.world` ranks for validated settings (cp divides the world, u divides
    cp); one process: the trivial mesh, no process group."""
    dp, u = info.world // cp, ulysses
    mesh = Mesh(info.rank, info.world, dp, cp, info.rank // cp, info.rank % cp)
    mesh.ulysses, mesh.uly_rank, mesh.outer_rank = u, mesh.cp_rank % u, mesh.cp_rank // u
    if info.world == 1:
        return mesh
    from torch.distributed.device_mesh import init_device_mesh
    dm = init_device_mesh(device_type, (dp, cp // u, u), mesh_dim_names=("dp", "cp_outer",
                                                                         "cp_inner"))
    mesh.device_mesh = dm
    if cp > 1:
        # a flattened dim of the same ranks as "cp_outer" or "cp_inner" (u == 1 or u == cp)
        # is the same group: strategies compare groups by identity
        mesh.cp_group = dm["cp_outer", "cp_inner"]._flatten("cp").get_group()
        mesh.uly_group = mesh.cp_group if u == cp else (dm["cp_inner"].get_group() if u > 1
                                                        else None)
        mesh.outer_group = mesh.cp_group if u == 1 else (dm["cp_outer"].get_group()
                                                         if cp // u > 1 else None)
    if dp > 1:
        mesh.dp_group = dm["dp"].get_group()
    return mesh
