"""2-D context parallelism (`cp.ulysses` inside `cp.size`): the mesh's groups, and 4 gloo
ranks (cp = 4, u = 2 and u = 4) equal to the single-process run for
every family with its auto strategy (and ring for the softmax families), with and without
documents, zigzag and contiguous, plus a hybrid model (fp32, relative error < 1e-5)."""
import pytest

from parallel.dist import DistInfo
from parallel.mesh import build_mesh

import cp_cases
from test_context_parallel import FAMILIES, OPTIONS


def _mesh_worker(rank, world, init_file, out_dir):
    import json
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        m = build_mesh(DistInfo(rank, world, rank), 4, 2, "cpu")
        members = {name: None if g is None else dist.get_process_group_ranks(g)
                   for name, g in (("cp", m.cp_group), ("dp", m.dp_group), ("uly", m.uly_group),
                                   ("outer", m.outer_group))}
        row = {"coords": [m.dp, m.cp, m.ulysses, m.outer, m.dp_rank, m.cp_rank, m.uly_rank,
                          m.outer_rank], **members}
        (out_dir / f"{rank}.json").write_text(json.dumps(row))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_mesh_groups(tmp_path):
    """dp = 2, cp = 4, u = 2 on 8 gloo ranks (torch's DeviceMesh): every rank's groups are the
    ones cp_rank = outer_rank·u + uly_rank and rank = dp_rank·cp + cp_rank imply."""
    import json
    import torch.multiprocessing as mp
    mp.start_processes(_mesh_worker, args=(8, str(tmp_path / "init"), tmp_path), nprocs=8,
                       start_method="spawn")
    for rank in range(8):
        row = json.loads((tmp_path / f"{rank}.json").read_text())
        assert row["coords"] == [2, 4, 2, 2, rank // 4, rank % 4, rank % 2, rank % 4 // 2]
        base, outer, uly = 4 * (rank // 4), rank % 4 // 2, rank % 2
        assert row["cp"] == list(range(base, base + 4))
        assert row["dp"] == [rank % 4, rank % 4 + 4]
        assert row["uly"] == [base + 2 * outer, base + 2 * outer + 1]
        assert row["outer"] == [base + uly, base + uly + 2]


def cases(seed):
    out = []
    for family in FAMILIES:
        strategies = ["auto"] + (["ring"] if "ring" in cp_cases.servable(family) else [])
        for strategy in strategies:
            for layout in ("zigzag", "contiguous"):
                for docs in (False, True):
                    out.append(("core", 2, family, strategy, layout, docs, seed, OPTIONS.get(family)))
    for family in [f for f in ("flash", "lightning") if f in FAMILIES]:  # u == cp: pure Ulysses
        for layout in ("zigzag", "contiguous"):
            out.append(("core", 4, family, "auto", layout, layout == "zigzag", seed,
                        OPTIONS.get(family)))
    pattern = [f for f in ("lightning", "sdpa") if f in FAMILIES] + ["sdpa"]
    for layout in ("zigzag", "contiguous"):
        out.append(("model", 2, pattern, layout, seed + 1))
    return out


@pytest.mark.slow
def test_ulysses_inside_cp_matches_single_process(tmp_path, fresh_seed):
    cp_cases.run_workers(4, cases(fresh_seed), tmp_path)
