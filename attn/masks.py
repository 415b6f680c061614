"""Dense masks from the attention contract (DESIGN.md): the definition the ref paths use.

Positions are absolute: query i sits at q_offset + i, key j at j. With cu_seqlens the keys
(and queries, at their absolute positions) belong to documents, and no query sees another
document. These masks are O(Tq·Tk): for references, tests and short CPU runs only.
"""
from __future__ import annotations

import torch


def document_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Document index of every position 0..total-1 ([total], int64)."""
    pos = torch.arange(total, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].long(), pos, right=True)


def causal_mask(tq: int, tk: int, q_offset: int = 0, cu_seqlens: torch.Tensor | None = None,
                window: int | None = None, device=None) -> torch.Tensor:
    """Boolean [tq, tk] mask, True where query i may attend key j."""
    if q_offset < 0 or q_offset + tq > tk:
        raise ValueError(f"q_offset={q_offset} with Tq={tq} needs 0 <= q_offset and "
                         f"q_offset+Tq <= Tk={tk}")
    qpos = torch.arange(tq, device=device) + q_offset
    kpos = torch.arange(tk, device=device)
    allowed = kpos[None, :] <= qpos[:, None]
    if window is not None:
        allowed &= kpos[None, :] > qpos[:, None] - window
    if cu_seqlens is not None:
        doc = document_ids(cu_seqlens.to(device), tk)
        allowed &= doc[None, :] == doc[qpos][:, None]
    return allowed
