"""attn.common.documents: the per-key document bounds and the block table over documents,
against definitions built position by position."""
from __future__ import annotations

import torch

from attn.common.documents import block_table, build_block_table, key_doc_bounds


def _docs(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def test_key_doc_bounds():
    cu = _docs([3, 1, 7, 5])
    first, last = key_doc_bounds(cu, 16)
    for s in range(16):
        d = max(i for i in range(4) if cu[i] <= s)
        assert (first[s], last[s]) == (cu[d], cu[d + 1] - 1)
    assert first.dtype == last.dtype == torch.int32
    assert key_doc_bounds(None, 16) is None


def test_block_table_with_documents():
    """Blocks of `bs` keys restart at every document; numbering is global, document by
    document; firstb is the first block of the key's document."""
    bs, cu = 4, _docs([5, 4, 1, 9])
    kblk, firstb, start, end = block_table(cu, 19, bs, "cpu")
    want, first_of_doc = [], []
    for d in range(4):
        a, b = int(cu[d]), int(cu[d + 1])
        first_of_doc.append(len(want))
        want += [(s, min(s + bs, b)) for s in range(a, b, bs)]
    assert [(int(a), int(b)) for a, b in zip(start, end)] == want
    for s in range(19):
        d = max(i for i in range(4) if cu[i] <= s)
        j = int(kblk[s])
        assert want[j][0] <= s < want[j][1] and int(firstb[s]) == first_of_doc[d]


def test_block_table_cache():
    """Without documents the table is built once per (Tk, block, device) and equals a fresh
    build."""
    t1, t2 = block_table(None, 70, 8, "cpu"), block_table(None, 70, 8, "cpu")
    assert t1 is t2
    assert all(torch.equal(a, b) for a, b in zip(t1, build_block_table(None, 70, 8, "cpu")))
