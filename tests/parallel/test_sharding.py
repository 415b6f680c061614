"""Single-process checks of the token layouts and the strategies' bookkeeping."""
import pytest
import torch

from parallel.allgather import clip_cu_seqlens
from parallel.lasp import local_cu_seqlens
from parallel.ring import _blocks, make_ring_attend
from parallel.sharding import (Placement, SeqGroup, chunk_bounds, flatten_rows, gather_order,
                               layout_placement, local_indices, shard_batch)


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_layouts_partition_the_sequence(cp, layout):
    total = 2 * cp * 5
    idx = torch.cat([local_indices(total, cp, r, layout) for r in range(cp)])
    assert sorted(idx.tolist()) == list(range(total))
    assert torch.equal(gather_order(total, cp, layout), idx)
    if layout == "zigzag":
        assert chunk_bounds(total, cp, 0, layout) == [(0, 5), ((2 * cp - 1) * 5, 2 * cp * 5)]


def test_uneven_micro_batch_names_the_rule():
    with pytest.raises(ValueError, match="divisible by 2·cp.size = 4"):
        chunk_bounds(10, 2, 0, "zigzag")


def test_shard_batch_flattens_rows_and_keeps_global_cu_seqlens():
    mb = {"input_ids": torch.arange(16).reshape(2, 8), "labels": torch.arange(16).reshape(2, 8) + 100,
          "positions": torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4], [5, 6, 7, 8, 0, 1, 2, 3]]),
          "cu_seqlens": torch.tensor([0, 3, 12, 16], dtype=torch.int32)}
    flat = flatten_rows(mb)
    assert flat["cu_seqlens"].tolist() == [0, 3, 8, 12, 16]  # the row start at 8 is added
    part = shard_batch(mb, 2, 1, "zigzag")                      # chunks 1 and 2 of 4
    assert part["input_ids"].tolist() == [[4, 5, 6, 7, 8, 9, 10, 11]]
    assert part["labels"].tolist() == [[104, 105, 106, 107, 108, 109, 110, 111]]
    assert part["positions"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8]]
    assert torch.equal(part["cu_seqlens"], flat["cu_seqlens"])


def test_cu_seqlens_clipping():
    cu = torch.tensor([0, 3, 8, 12, 16], dtype=torch.int32)
    assert clip_cu_seqlens(cu, 10).tolist() == [0, 3, 8, 10]
    assert clip_cu_seqlens(cu, 8).tolist() == [0, 3, 8]
    assert local_cu_seqlens(cu, 4, 12).tolist() == [0, 4, 8]
    assert local_cu_seqlens(cu, 8, 12).tolist() == [0, 4]


def _placements():
    """(cp, layout, u, placement): the cp group's, and every outer group's under u | cp."""
    out = []
    for cp in (2, 3, 4, 6):
        for layout in ("zigzag", "contiguous"):
            for u in (u for u in range(1, cp) if cp % u == 0):
                out.append((cp, layout, u, layout_placement(cp, layout).grouped(u)))
    return out


@pytest.mark.parametrize("cp,layout,u,placement", _placements(),
                         ids=[f"cp{c}-{l}-u{u}" for c, l, u, _ in _placements()])
def test_ring_blocks_cover_exactly_the_causal_pairs(cp, layout, u, placement):
    """Over all steps, each member's blocks visit every (query, key) pair with key <= query once."""
    size = 3
    total = placement.n_chunks * size
    for me in range(placement.size):
        q_idx = placement.indices(total, me)
        seen = torch.zeros(total, total, dtype=torch.int64)
        for src in range(placement.size):
            k_idx = placement.indices(total, src)
            for rows, cols, causal in _blocks(placement, me, src, size):
                qi, ki = q_idx[rows], k_idx[cols]
                vis = torch.ones(len(qi), len(ki), dtype=torch.bool)
                if causal:
                    vis = torch.arange(len(ki))[None, :] <= torch.arange(len(qi))[:, None]
                    assert torch.equal(vis, ki[None, :] <= qi[:, None])  # local order is causal
                else:
                    assert bool((ki[None, :] < qi[:, None]).all())        # full blocks are visible
                seen[qi[:, None].expand_as(vis)[vis], ki[None, :].expand_as(vis)[vis]] += 1
        want = (torch.arange(total)[None, :] <= torch.arange(total)[:, None]).long()
        assert torch.equal(seen[q_idx], want[q_idx])


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_ring_schedule_of_the_cp_group_is_the_layout_one(layout):
    """Without Ulysses the derived schedule is the hand-made one: one call per step (zigzag: from
    an earlier rank every query × the first key half, from a later one the second query half ×
    every key; contiguous: every × every from an earlier rank, nothing from a later one)."""
    cp, size = 4, 5
    n = size * (2 if layout == "zigzag" else 1)
    every, first, second = slice(0, n), slice(0, n // 2), slice(n // 2, n)
    place = layout_placement(cp, layout)
    for me in range(cp):
        for src in range(cp):
            got = _blocks(place, me, src, size)
            if src == me:
                assert got == [(every, every, True)]
            elif layout == "zigzag":
                assert got == ([(every, first, False)] if src < me else [(second, every, False)])
            else:
                assert got == ([(every, every, False)] if src < me else [])


def test_placements():
    zz = layout_placement(4, "zigzag")
    assert zz.members == ((0, 7), (1, 6), (2, 5), (3, 4))
    assert zz.grouped(2).members == ((0, 1, 6, 7), (2, 3, 4, 5))
    assert zz.grouped(4).members == (tuple(range(8)),)
    assert layout_placement(4, "contiguous").grouped(2).members == ((0, 1), (2, 3))
    assert zz.grouped(2).bounds(16, 1) == [(4, 6), (6, 8), (8, 10), (10, 12)]
    assert torch.equal(zz.grouped(2).order(8), torch.tensor([0, 1, 6, 7, 2, 3, 4, 5]))
    with pytest.raises(ValueError, match="each member's ids increasing"):
        Placement(2, ((1, 0),))
    with pytest.raises(ValueError, match="must split 4 chunks evenly"):
        Placement(4, ((0, 1, 2), (3,)))


def test_ring_refuses_documents():
    from attn.flash import flash_bwd, flash_fwd
    attend = make_ring_attend(SeqGroup(layout_placement(2, "zigzag"), 0, None), 0.5, flash_fwd,
                              flash_bwd)
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(ValueError, match="ring needs one document per micro-batch"):
        attend(q, q, q, torch.tensor([0, 3, 16], dtype=torch.int32))
