"""Single-process checks of the token layouts and the strategies' bookkeeping."""
from types import SimpleNamespace

import pytest
import torch

from parallel.allgather import clip_cu_seqlens
from parallel.lasp import local_cu_seqlens
from parallel.ring import _blocks, make_ring_attend
from parallel.sharding import chunk_bounds, flatten_rows, gather_order, local_indices, shard_batch


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_layouts_partition_the_sequence(cp, layout):
    total = 2 * cp * 5
    idx = torch.cat([local_indices(total, cp, r, layout) for r in range(cp)])
    assert sorted(idx.tolist()) == list(range(total))
    assert torch.equal(gather_order(total, cp, layout), idx)
    if layout == "zigzag":
        assert chunk_bounds(total, cp, 0, layout) == [(0, 5), ((2 * cp - 1) * 5, 2 * cp * 5)]


def test_layout_errors_name_the_key():
    with pytest.raises(ValueError, match="divisible by 2·parallel.cp = 4"):
        chunk_bounds(10, 2, 0, "zigzag")
    with pytest.raises(ValueError, match="parallel.cp_layout='diagonal'"):
        chunk_bounds(8, 2, 0, "diagonal")


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


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("cp", [2, 3, 4])
def test_ring_blocks_cover_exactly_the_causal_pairs(cp, layout):
    """Over all steps, each rank's blocks visit every (query, key) pair with key <= query once."""
    total = 2 * cp * 3
    for rank in range(cp):
        q_idx = local_indices(total, cp, rank, layout)
        seen = torch.zeros(total, total, dtype=torch.int64)
        for src in range(cp):
            k_idx = local_indices(total, cp, src, layout)
            for rows, cols, causal in _blocks(rank, src, len(q_idx), layout):
                qi, ki = q_idx[rows], k_idx[cols]
                vis = torch.ones(len(qi), len(ki), dtype=torch.bool)
                if causal:
                    vis = torch.arange(len(ki))[None, :] <= torch.arange(len(qi))[:, None]
                    assert torch.equal(vis, ki[None, :] <= qi[:, None])  # local order is causal
                seen[qi[:, None].expand_as(vis)[vis], ki[None, :].expand_as(vis)[vis]] += 1
        want = (torch.arange(total)[None, :] <= torch.arange(total)[:, None]).long()
        assert torch.equal(seen[q_idx], want[q_idx])


def test_ring_refuses_documents():
    attend = make_ring_attend(SimpleNamespace(cp=2, cp_rank=0, cp_group=None), "zigzag", 0.5)
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(ValueError, match="ring needs one document per micro-batch"):
        attend(q, q, q, torch.tensor([0, 3, 16], dtype=torch.int32))
