"""Per tile of the selected branch's forward / dQ kernel (attn/nsa/slc.py `_rows_kernel`): the
union of the blocks its query positions selected, as a list in ascending id order with the
blocks' key ranges, so the kernel's loop over it is a counted loop whose K/V loads the compiler
software-pipelines (a search for each next id makes every load wait on the previous step).

Memory plan (_union_kernel): one program per (SUB tiles of QPP positions, batch·KV head); per
tile its U = QPP·NSEL_P selection ids [U] in registers, compared with themselves CH at a time
([U, CH] int32); the first-occurrence flags pass once through the USTART output (global memory,
read back after a barrier) for the second count; outputs UNION, USTART, UEND [B·Hkv, n_tiles, U]
int32 (first UCNT entries used) and UCNT [B·Hkv, n_tiles]. Deterministic, no sort, no atomics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from attn.common import alloc
from attn.dispatch import INTERPRET


@triton.jit
def _tile_ids(SEL, b, hkv, tile, j, Tq, NB, HKV: tl.constexpr, NSEL: tl.constexpr,
              NSEL_P: tl.constexpr, QPP: tl.constexpr):
    """The selection ids at flat positions j (row j // NSEL_P of the tile, slot j % NSEL_P);
    empty slots, bad ids and padding hold NB ("none")."""
    rows = tile * QPP + j // NSEL_P
    slot = j % NSEL_P
    ok = (rows < Tq) & (slot < NSEL)
    ids = tl.load(SEL + ((b.to(tl.int64) * Tq + rows) * HKV + hkv) * NSEL + slot, mask=ok,
                  other=-1)
    return tl.where((ids >= 0) & (ids < NB), ids, NB)


@triton.jit
def _union_tile(SEL, UNION, USTART, UEND, UCNT, BLK_START, BLK_END, tile, n_tiles, pid_bh, Tq,
                NB, HKV: tl.constexpr, NSEL: tl.constexpr, NSEL_P: tl.constexpr,
                QPP: tl.constexpr, CH: tl.constexpr):
    """The union of one tile's selected blocks, ascending, with their key ranges. Over the
    U = QPP·NSEL_P ids, by comparisons in [U, CH] chunks (no sort): id i is a first occurrence
    when no earlier id equals it, and its place in the union is the number of first occurrences
    with a smaller id. The first-occurrence flags pass through USTART (global, read back after a
    barrier) for the second count."""
    U: tl.constexpr = QPP * NSEL_P
    b = pid_bh // HKV
    hkv = pid_bh % HKV
    offs = tl.arange(0, U)
    x = _tile_ids(SEL, b, hkv, tile, offs, Tq, NB, HKV, NSEL, NSEL_P, QPP)
    dup = offs < 0
    for c in range(0, U, CH):
        offs_j = c + tl.arange(0, CH)
        xj = _tile_ids(SEL, b, hkv, tile, offs_j, Tq, NB, HKV, NSEL, NSEL_P, QPP)
        same = (xj[None, :] == x[:, None]) & (offs_j[None, :] < offs[:, None])
        dup = dup | (tl.max(same.to(tl.int32), 1) > 0)
    first = (~dup) & (x < NB)
    u_base = (pid_bh.to(tl.int64) * n_tiles + tile) * U
    tl.store(USTART + u_base + offs, first.to(tl.int32))
    tl.debug_barrier()                  # the flags above are visible to the whole program
    pos = tl.zeros([U], dtype=tl.int32)
    for c in range(0, U, CH):
        offs_j = c + tl.arange(0, CH)
        xj = _tile_ids(SEL, b, hkv, tile, offs_j, Tq, NB, HKV, NSEL, NSEL_P, QPP)
        fj = tl.load(USTART + u_base + offs_j)
        pos += tl.sum(((fj[None, :] != 0) & (xj[None, :] < x[:, None])).to(tl.int32), 1)
    tl.debug_barrier()                  # every flag read before the union overwrites them
    safe = tl.minimum(x, NB - 1)
    tl.store(UNION + u_base + pos, x, mask=first)
    tl.store(USTART + u_base + pos, tl.load(BLK_START + safe), mask=first)
    tl.store(UEND + u_base + pos, tl.load(BLK_END + safe), mask=first)
    tl.store(UCNT + pid_bh.to(tl.int64) * n_tiles + tile, tl.sum(first.to(tl.int32), 0))


@triton.jit
def _union_kernel(SEL, UNION, USTART, UEND, UCNT, BLK_START, BLK_END, n_tiles, Tq, NB,
                  HKV: tl.constexpr, NSEL: tl.constexpr, NSEL_P: tl.constexpr,
                  QPP: tl.constexpr, CH: tl.constexpr, SUB: tl.constexpr):
    """One program per SUB consecutive tiles of QPP positions (fewer, longer programs where the
    tiles are small) and batch·KV head."""
    for sub in range(SUB):
        tile = tl.program_id(0) * SUB + sub
        if tile < n_tiles:
            _union_tile(SEL, UNION, USTART, UEND, UCNT, BLK_START, BLK_END, tile, n_tiles,
                        tl.program_id(1), Tq, NB, HKV, NSEL, NSEL_P, QPP, CH)


def _union_chunk(u: int) -> int:
    # [U, CH] comparisons per step: CH = 32 is the sweep's fastest (docs/nsa_notes.md; 64
    # spills at U = 256). The interpreter takes all U at once (numpy).
    return u if INTERPRET else min(u, 32)


def tile_unions(sel, nb: int, meta, blk_start, blk_end, per_program: int = 1):
    """Per (batch·KV head, tile of QPP positions): the union of the tile's selected blocks in
    ascending order (_union_kernel): (UNION, USTART, UEND) int32 [B·Hkv, n_tiles, QPP·NSEL_P]
    (ids and key ranges [USTART, UEND); entries past the count are unspecified) and UCNT int32
    [B·Hkv, n_tiles]. per_program: tiles per program (small tiles: fewer programs)."""
    B, tq, hkv, nsel = sel.shape
    qpp, nsel_p = meta["QPP"], meta["NSEL_P"]
    nt = triton.cdiv(tq, qpp)
    union, ustart, uend = (alloc.empty((B * hkv, nt, qpp * nsel_p), torch.int32, sel.device)
                           for _ in range(3))
    ucnt = alloc.empty((B * hkv, nt), torch.int32, sel.device)
    _union_kernel[(triton.cdiv(nt, per_program), B * hkv)](
        sel, union, ustart, uend, ucnt, blk_start, blk_end, nt, tq, nb, HKV=hkv, NSEL=nsel,
        NSEL_P=nsel_p, QPP=qpp, CH=_union_chunk(qpp * nsel_p), SUB=per_program, num_warps=4)
    return union, ustart, uend, ucnt
