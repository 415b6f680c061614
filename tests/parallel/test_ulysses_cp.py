"""2-D context parallelism (`parallel.ulysses` inside `parallel.cp`): the mesh's groups, the
config errors, and 4 gloo ranks (cp = 4, u = 2 and u = 4) equal to the single-process run for
every family with its auto strategy (and ring for the softmax families), with and without
documents, zigzag and contiguous, plus a hybrid model (fp32, relative error < 1e-5)."""
from types import SimpleNamespace

import pytest

from attn import get_core
from parallel.context import apply_context_parallel
from parallel.dist import DistInfo
from parallel.mesh import Mesh, build_mesh

import cp_cases
from test_context_parallel import FAMILIES, OPTIONS


def test_mesh_groups(monkeypatch):
    """dp = 2, cp = 4, u = 2 on 8 ranks: every rank makes the same new_group calls, and its
    groups are the ones cp_rank = outer_rank·u + uly_rank implies."""
    calls = {}
    for rank in range(8):
        made = calls[rank] = []
        monkeypatch.setattr("torch.distributed.new_group", lambda ranks: made.append(tuple(ranks))
                            or tuple(ranks))
        m = build_mesh(DistInfo(rank, 8, rank), 4, 2)
        assert (m.dp, m.cp, m.ulysses, m.outer) == (2, 4, 2, 2)
        assert (m.dp_rank, m.cp_rank, m.uly_rank, m.outer_rank) == (rank // 4, rank % 4, rank % 2,
                                                                     rank % 4 // 2)
        base = 4 * m.dp_rank
        assert m.cp_group == tuple(range(base, base + 4))
        assert m.dp_group == (rank % 4, rank % 4 + 4)
        assert m.uly_group == (base + 2 * m.outer_rank, base + 2 * m.outer_rank + 1)
        assert m.outer_group == (base + m.uly_rank, base + m.uly_rank + 2)
    assert all(calls[r] == calls[0] for r in range(8))
    for u, uly, outer in ((1, None, "cp"), (4, "cp", None)):  # no group beyond cp and dp
        made = []
        monkeypatch.setattr("torch.distributed.new_group", lambda ranks: made.append(1) or ranks)
        m = build_mesh(DistInfo(1, 8, 1), 4, u)
        assert len(made) == 2 + 4
        assert m.uly_group is (m.cp_group if uly else None)
        assert m.outer_group is (m.cp_group if outer else None)


def test_bad_ulysses_settings_name_the_keys():
    with pytest.raises(ValueError, match=r"parallel.ulysses=3 must be >= 1 and divide parallel.cp=4"):
        build_mesh(DistInfo(0, 4, 0), 4, 3)
    with pytest.raises(ValueError, match=r"parallel.ulysses=0 must be >= 1"):
        build_mesh(DistInfo(0, 4, 0), 4, 0)
    mesh = Mesh(0, 4, 1, 4, 0, 0, ulysses=2)  # no process group is touched before the checks
    holder = SimpleNamespace(layers=[SimpleNamespace(attn=get_core("sdpa")(48, 6, 3))])
    with pytest.raises(ValueError, match=r"parallel.ulysses=2 needs model.n_heads=6 and "
                                         r"model.n_kv_heads=3 divisible by the Ulysses degree 2 \(layer 0\)"):
        apply_context_parallel(holder, mesh, "auto", "zigzag")
    holder = SimpleNamespace(layers=[SimpleNamespace(attn=get_core("sdpa")(48, 4, 2))])
    with pytest.raises(ValueError, match=r"parallel.cp_strategy=ulysses is Ulysses over the whole "
                                         r"cp group; with parallel.ulysses=2 < parallel.cp=4"):
        apply_context_parallel(holder, mesh, "ulysses", "zigzag")
    with pytest.raises(ValueError, match=r"parallel.cp_strategy=ring does not support attn family"):
        apply_context_parallel(SimpleNamespace(layers=[SimpleNamespace(
            attn=get_core("linear")(32, 4, 4))]), mesh, "ring", "zigzag")


def cases(seed):
    out = []
    for family in FAMILIES:
        strategies = ["auto"] + (["ring"] if family in ("sdpa", "flash") else [])
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
