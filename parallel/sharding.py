"""Token layouts for context parallelism: which global tokens each cp rank holds.

A micro-batch [B, T] is first flattened to one sequence of B·T tokens whose `cu_seqlens`
(always present under CP) mark every row start, so rows never see each other; that sequence
is then cut into chunks:
- contiguous: cp chunks, rank r holds chunk r;
- zigzag: 2·cp chunks, rank r holds chunks r and 2·cp−1−r, so causal attention costs every rank
  the same (early chunks see few keys, late chunks many).
Inputs, labels, positions are selected with the same indices; cu_seqlens stay global.
"""
from __future__ import annotations

import torch

LAYOUTS = ("zigzag", "contiguous")


def chunk_bounds(total: int, cp: int, rank: int, layout: str) -> list[tuple[int, int]]:
    """[(start, end)] of the global token ranges held by `rank`, in the order they are stored."""
    if layout not in LAYOUTS:
        raise ValueError(f"parallel.cp_layout={layout!r} must be one of {LAYOUTS}")
    n_chunks = 2 * cp if layout == "zigzag" else cp
    if total % n_chunks:
        raise ValueError(f"tokens per micro-batch ({total}) must be divisible by "
                         f"{'2·' if layout == 'zigzag' else ''}parallel.cp = {n_chunks} "
                         f"({layout} layout)")
    size = total // n_chunks
    return [(i * size, (i + 1) * size) for i in chunk_ids(rank, cp, layout)]


def chunk_ids(rank: int, cp: int, layout: str) -> list[int]:
    """Indices of the chunks `rank` holds, in storage order."""
    return [rank, 2 * cp - 1 - rank] if layout == "zigzag" else [rank]


def local_indices(total: int, cp: int, rank: int, layout: str, device=None) -> torch.Tensor:
    return torch.cat([torch.arange(s, e, device=device)
                      for s, e in chunk_bounds(total, cp, rank, layout)])


def gather_order(total: int, cp: int, layout: str, device=None) -> torch.Tensor:
    """Global index of each position of the rank-ordered concatenation of all shards (what an
    all-gather returns); its argsort restores sequence order."""
    return torch.cat([local_indices(total, cp, r, layout, device) for r in range(cp)])


def flatten_rows(mb: dict) -> dict:
    """[B, T] micro-batch -> one sequence [1, B·T] whose cu_seqlens include every row start."""
    B, T = mb["input_ids"].shape
    cu = mb.get("cu_seqlens")
    rows = torch.arange(0, B * T + 1, T, dtype=torch.int32)
    cu = rows if cu is None else torch.unique(torch.cat([cu.to(torch.int32), rows]))
    out = {k: mb[k].reshape(1, B * T) for k in ("input_ids", "labels", "positions")}
    out["cu_seqlens"] = cu.to(torch.int32)
    return out


def shard_batch(mb: dict, cp: int, cp_rank: int, layout: str) -> dict:
    """This rank's part of a micro-batch for context parallelism (cu_seqlens stay global)."""
    flat = flatten_rows(mb)
    total = flat["input_ids"].shape[1]
    idx = local_indices(total, cp, cp_rank, layout)
    out = {k: flat[k][:, idx].contiguous() for k in ("input_ids", "labels", "positions")}
    out["cu_seqlens"] = flat["cu_seqlens"]
    return out
