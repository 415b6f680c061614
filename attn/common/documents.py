"""Layout of the key sequence over documents (cu_seqlens, int32 [N+1]), as int32 arrays built by
torch ops on the device: per-key document bounds, and the table of fixed-size key blocks that
restart at every document (MoBA's gate blocks, NSA's selection blocks)."""
from __future__ import annotations

import torch


def key_doc_bounds(cu_seqlens, tk: int):
    """(first, last) position of every key position's document, int32 [Tk] each; None without
    documents."""
    if cu_seqlens is None:
        return None
    pos = torch.arange(tk, device=cu_seqlens.device, dtype=torch.int32)
    cu = cu_seqlens.to(torch.int32)
    doc = torch.searchsorted(cu[1:], pos, right=True)
    return cu[doc].contiguous(), (cu[doc + 1] - 1).contiguous()


_TABLES: dict = {}  # (tk, block_size, device) -> the table without documents (read-only reuse)
_MAX_TABLES = 32  # cached tables kept before the cache is emptied (a handful of shapes per run)


def block_table(cu_seqlens, tk: int, block_size: int, device):
    """(kblk [Tk], firstb [Tk], blk_start [NB], blk_end [NB]) int32, blocks numbered globally,
    document after document: block j of a document covers keys [doc_start + j·block_size,
    min(doc_start + (j+1)·block_size, doc_end)); kblk is every key's block, firstb the first
    block of its document. Without documents the table depends on (Tk, block_size) only and is
    built once per device (callers never write into it)."""
    if cu_seqlens is None:
        key = (tk, block_size, str(device))
        if key not in _TABLES:
            if len(_TABLES) > _MAX_TABLES:
                _TABLES.clear()
            _TABLES[key] = build_block_table(None, tk, block_size, device)
        return _TABLES[key]
    return build_block_table(cu_seqlens, tk, block_size, device)


def build_block_table(cu_seqlens, tk: int, block_size: int, device):
    """block_table without the cache (with documents: O(Tk) torch ops and one host read, the
    block count)."""
    pos = torch.arange(tk, device=device, dtype=torch.int64)
    if cu_seqlens is None:
        start = torch.zeros_like(pos)
        end = torch.full_like(pos, tk)
        firstb = torch.zeros_like(pos)
        kblk = pos // block_size
    else:
        cu = cu_seqlens.to(device).long()
        doc = torch.searchsorted(cu[1:], pos, right=True)
        start, end = cu[doc], cu[doc + 1]
        nb_doc = (cu[1:] - cu[:-1] + block_size - 1) // block_size
        first_doc = torch.cumsum(nb_doc, 0) - nb_doc
        firstb = first_doc[doc]
        kblk = firstb + (pos - start) // block_size
    # number of blocks: host arithmetic without documents, one device read with them
    nb = -(-tk // block_size) if cu_seqlens is None else (int(kblk[-1]) + 1 if tk else 0)
    heads = (pos - start) % block_size == 0                   # first key of every block
    blk_start = torch.empty(nb, dtype=torch.int64, device=device)
    blk_end = torch.empty(nb, dtype=torch.int64, device=device)
    blk_start[kblk[heads]] = pos[heads]
    blk_end[kblk[heads]] = torch.minimum(pos[heads] + block_size, end[heads])
    i32 = lambda t: t.to(torch.int32).contiguous()  # noqa: E731
    return i32(kblk), i32(firstb), i32(blk_start), i32(blk_end)
