"""The Triton inverse routing index (attn/moba/index.py) against the torch one (routed.py), under
the interpreter on CPU (conftest sets TRITON_INTERPRET=1 when there is no GPU): ROWPTR equal,
ENTRIES[:ROWPTR[-1]] equal; the kernels write every output word (outputs are poisoned with -7)
and the tail lists the unused slots, so ENTRIES is a permutation of each batch·head's entries.
Shapes: B 1/2, Hq 1/3, Tq 1/37/300 (not multiples of the tile), NSEL 1..3, nb 1/5/200 (200 >
the tile: ROWPTR is copied in several steps), slots and whole rows unused. The interpreter's
tl.sort costs ~0.1 s per tile, so the shapes stay small. GPU size: the last test."""
from __future__ import annotations

import pytest
import torch

from attn.common import alloc
from attn.moba.index import routed_entries_triton
from attn.moba.routed import routed_entries
from moba_testlib import nan_empty


def random_sel(B, hq, tq, nsel, nb, p_slot=0.25, p_row=0.15, device="cpu"):
    """Distinct random blocks per row (at most nb of them), then slots (p_slot) and whole rows
    (p_row) set to -1."""
    k = min(nsel, nb)
    sel = torch.rand(B, hq, tq, nb, device=device).argsort(-1)[..., :k].to(torch.int32)
    pad = torch.full((B, hq, tq, nsel - k), -1, dtype=torch.int32, device=device)
    sel = torch.cat([sel, pad], -1)[..., torch.randperm(nsel, device=device)]
    sel[torch.rand(sel.shape, device=device) < p_slot] = -1
    sel[torch.rand(B, hq, tq, device=device) < p_row] = -1
    return sel


def check(sel, nb, tile=None):
    rowptr, entries = routed_entries_triton(sel, nb, tile=tile)
    ref_rowptr, ref_entries = routed_entries(sel, nb)
    assert rowptr.dtype == entries.dtype == torch.int32
    assert rowptr.shape == ref_rowptr.shape and entries.shape == ref_entries.shape
    assert torch.equal(rowptr, ref_rowptr)
    used = int(rowptr[-1])
    assert torch.equal(entries[:used], ref_entries[:used])
    # beyond ROWPTR[-1]: the unused slots, so each bh's entries form a permutation of 0..n-1
    B, hq, tq, nsel = sel.shape
    n = tq * nsel
    bh_of = torch.cat([torch.repeat_interleave(
        torch.arange(B * hq, device=sel.device), (rowptr[nb::nb] - rowptr[:-1:nb]).long()),
        (sel.reshape(B * hq, n) < 0).nonzero()[:, 0]])
    flat = (bh_of * n + entries.long()).sort().values
    assert torch.equal(flat, torch.arange(B * hq * n, device=sel.device))
    return rowptr, entries


@pytest.mark.parametrize("shape,tile", [
    ((1, 1, 1, 1, 1), None),          # one entry
    ((1, 3, 37, 2, 5), None),         # several heads, Tq*NSEL not a multiple of the tile
    ((2, 3, 37, 3, 200), 16),         # batch, nb > tile, most blocks absent from a tile
    ((2, 1, 300, 1, 5), None),        # NSEL 1, long runs of one block within a tile
    ((1, 1, 300, 3, 200), 64),        # larger tile
    ((1, 3, 100, 2, 1), 32),          # nb 1: the second slot is always unused
    ((1, 1, 37, 3, 5), 256),          # one tile holding every entry, padding lanes
], ids=lambda v: str(v))
def test_matches_torch(monkeypatch, shape, tile):
    monkeypatch.setattr(alloc, "empty", nan_empty)
    B, hq, tq, nsel, nb = shape
    check(random_sel(B, hq, tq, nsel, nb), nb, tile)


def test_all_unused_and_all_used(monkeypatch):
    monkeypatch.setattr(alloc, "empty", nan_empty)
    check(torch.full((1, 2, 20, 2), -1, dtype=torch.int32), 7)
    check(random_sel(1, 2, 20, 2, 7, p_slot=0.0, p_row=0.0), 7)
    # every row on the same block: one run per tile, ranks across tiles
    check(torch.full((1, 1, 50, 1), 3, dtype=torch.int32), 4)


def test_many_blocks_per_entry_fall_back_to_the_sort(monkeypatch):
    """nb large against the entries (short documents, small blocks): the per-tile counts would
    outgrow the index, so the torch sort builds it (same result); an explicit tile keeps the
    kernels (the other tests)."""
    from attn.moba import index
    monkeypatch.setattr(alloc, "empty", nan_empty)
    calls = []
    monkeypatch.setattr(index, "_tile_sort_kernel", calls)  # any launch would fail
    sel = random_sel(1, 2, 30, 2, 400)
    check(sel, 400)
    assert not calls


def test_bad_arguments():
    sel = torch.zeros(1, 1, 4, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="int32"):
        routed_entries_triton(sel.long(), 3)
    with pytest.raises(ValueError, match="power of two"):
        routed_entries_triton(sel, 3, tile=24)
    with pytest.raises(ValueError, match="2\\*\\*31"):
        routed_entries_triton(sel, 2 ** 31)


@pytest.mark.gpu
def test_gpu_training_size():
    sel = random_sel(1, 16, 65536, 2, 128, device="cuda")
    # routed rows pick earlier blocks only: the first block's rows (512 tokens) pick nothing
    sel[:, :, :512] = -1
    rowptr, entries = check(sel, 128)
    again = routed_entries_triton(sel, 128)
    assert torch.equal(rowptr, again[0]) and torch.equal(entries, again[1])  # deterministic
