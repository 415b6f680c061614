"""Cutting a token stream into training rows, with per-token positions and document boundaries.

The stream is documents back to back, each preceded by `bos_id`. Row r is
`stream[r*T : r*T + T + 1]` (T = seq_len): inputs are its first T tokens, labels its last T.
Rows overlap by one token, so every stream token (except the very last kept one) is an input
exactly once, and the incomplete tail is dropped.

Positions count from each document's start (the bos token is position 0), also for a row that
begins in the middle of a document: there the count continues from the document's real start,
so RoPE sees the same position a token would have in an unpacked run.
Document boundaries (for `cu_seqlens`) are at every row start and at every bos: a row's
leading fragment of an earlier document is its own segment.
"""
from __future__ import annotations

import numpy as np

_SCAN_CHUNK = 1 << 24  # bounds the temporary bool array when scanning a memory-mapped stream


def num_rows(n_tokens: int, seq_len: int) -> int:
    """How many complete rows of seq_len + 1 tokens with stride seq_len fit in the stream."""
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    return max((int(n_tokens) - 1) // seq_len, 0)


def find_bos(tokens: np.ndarray, bos_id: int) -> np.ndarray:
    """Sorted int64 offsets of every bos in the stream (the document starts)."""
    found = []
    for lo in range(0, len(tokens), _SCAN_CHUNK):
        hits = np.flatnonzero(np.asarray(tokens[lo:lo + _SCAN_CHUNK]) == bos_id)
        found.append(hits.astype(np.int64) + lo)
    return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)


def gather_rows(tokens: np.ndarray, rows: np.ndarray, seq_len: int) -> np.ndarray:
    """int64 [R, seq_len + 1]: row r is tokens[r*seq_len : r*seq_len + seq_len + 1]."""
    rows = np.asarray(rows, dtype=np.int64)
    # contiguous slices, one per row: cheap on a memory-mapped stream (no fancy-index copy)
    out = np.empty((len(rows), seq_len + 1), dtype=np.int64)
    for i, r in enumerate(rows):
        out[i] = tokens[r * seq_len: r * seq_len + seq_len + 1]
    return out


def row_first_positions(rows: np.ndarray, seq_len: int, bos_pos: np.ndarray) -> np.ndarray:
    """int64 [R]: position (within its document) of each row's first token.

    A row starting before the stream's first bos counts from the stream start.
    """
    starts = np.asarray(rows, dtype=np.int64) * seq_len
    if len(bos_pos) == 0:
        return starts
    k = np.searchsorted(bos_pos, starts, side="right") - 1  # latest bos at or before the start
    doc_start = np.where(k >= 0, bos_pos[np.maximum(k, 0)], 0)
    return starts - doc_start


def positions(inputs: np.ndarray, bos_id: int, first_pos: np.ndarray | None = None) -> np.ndarray:
    """int64 [R, T]: 0 at every bos, +1 per token; before a row's first bos, first_pos[r] + i."""
    inputs = np.atleast_2d(inputs)
    n, t = inputs.shape
    idx = np.arange(t, dtype=np.int64)[None, :]
    first = np.zeros(n, dtype=np.int64) if first_pos is None else np.asarray(first_pos, np.int64)
    # index of the latest bos at or before each token (-1: none yet in this row)
    last_bos = np.maximum.accumulate(np.where(inputs == bos_id, idx, -1), axis=1)
    return np.where(last_bos >= 0, idx - last_bos, first[:, None] + idx)


def cu_seqlens(inputs: np.ndarray, bos_id: int) -> np.ndarray:
    """int32 [N+1] segment boundaries over the flattened [R*T] tokens (flash-attn convention).

    A segment starts at every row start and every bos; the last entry is R*T.
    """
    inputs = np.atleast_2d(inputs)
    n, t = inputs.shape
    is_start = (inputs == bos_id)
    is_start[:, 0] = True
    starts = np.flatnonzero(is_start.reshape(-1))
    return np.append(starts, n * t).astype(np.int32)


def pack(tokens: np.ndarray, rows: np.ndarray, seq_len: int, bos_id: int,
         bos_pos: np.ndarray, document_mask: bool = True) -> dict:
    """numpy arrays of a micro-batch of the given rows: input_ids, labels, positions, cu_seqlens."""
    full = gather_rows(tokens, rows, seq_len)
    inputs, labels = full[:, :-1], full[:, 1:]
    pos = positions(inputs, bos_id, row_first_positions(rows, seq_len, bos_pos))
    return {
        "input_ids": np.ascontiguousarray(inputs),
        "labels": np.ascontiguousarray(labels),
        "positions": pos,
        "cu_seqlens": cu_seqlens(inputs, bos_id) if document_mask else None,
    }
