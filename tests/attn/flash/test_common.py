"""attn.flash.common.heavy_first: the launch order of the flash grids, in the interpreter
(TRITON_INTERPRET=1, tests/conftest.py). Every (rank, row) exactly once; inside each group of
rows rank-major (heaviest first), the short group first; n_sm = 0 is row-major. The kernels'
results under this order are the whole of test_flash.py (interpreter: INTERP_SMS)."""
from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from attn.flash import common

pytestmark = pytest.mark.skipif(not common.INTERPRET, reason="interpreter test (CPU tensors)")


@triton.jit
def _order_kernel(OUT, n_sm):
    rank, row = common.heavy_first(n_sm)
    lin = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    tl.store(OUT + lin * 2, rank)
    tl.store(OUT + lin * 2 + 1, row)


def _order(n_blk, n_rows, n_sm):
    out = torch.full((n_blk * n_rows, 2), -1, dtype=torch.int32)
    _order_kernel[(n_blk, n_rows)](out, n_sm)
    return [tuple(p) for p in out.tolist()]


@pytest.mark.parametrize("n_blk,n_rows,n_sm", [(4, 7, 3), (3, 5, 3), (8, 40, 66), (1, 5, 3),
                                               (5, 1, 3), (2, 9, 5), (8, 8, 0), (6, 4, 100)])
def test_heavy_first_is_a_grouped_permutation(n_blk, n_rows, n_sm):
    order = _order(n_blk, n_rows, n_sm)
    assert sorted(order) == [(r, w) for r in range(n_blk) for w in range(n_rows)]
    group = min(max(-(-2 * n_sm // n_blk), 1), n_rows)
    rem = n_rows % group
    sizes = ([rem] if rem else []) + [group] * (n_rows // group)
    pos, first = 0, 0
    for size in sizes:  # rows [first, first + size), rank-major, heaviest (rank 0) first
        want = [(r, first + i) for r in range(n_blk) for i in range(size)]
        assert order[pos:pos + size * n_blk] == want
        pos, first = pos + size * n_blk, first + size
    if n_sm == 0:
        assert order == [(r, w) for w in range(n_rows) for r in range(n_blk)]


def test_scores_ahead_rule(monkeypatch):
    """FLASH_FWD_AHEAD=auto: on for the 16-bit D = 128 tile list only (measured to pay there);
    0 / 1 force it either way."""
    monkeypatch.setattr(common, "FWD_AHEAD", None)
    assert common.fwd_ahead(128, fp8=False)
    assert not common.fwd_ahead(64, fp8=False) and not common.fwd_ahead(256, fp8=False)
    assert not common.fwd_ahead(128, fp8=True)
    monkeypatch.setattr(common, "FWD_AHEAD", False)
    assert not common.fwd_ahead(128, fp8=False)
    monkeypatch.setattr(common, "FWD_AHEAD", True)
    assert common.fwd_ahead(64, fp8=False)
