"""MoBA's inverse routing index as two Triton kernels: a drop-in for routed.routed_entries.

SEL int32 [B, Hq, Tq, NSEL] (blocks in [0, nb), -1 = unused slot) -> (ROWPTR int32
[B·Hq·nb + 1], ENTRIES int32 [B·Hq·Tq·NSEL]): the entries e = row·NSEL + slot of batch·head bh
that chose block j are ENTRIES[ROWPTR[bh·nb + j] : ROWPTR[bh·nb + j + 1]], ascending. Same
result as the torch version, bit for bit, deterministic (no atomics: every word has one writer).

Counting sort over tiles of E consecutive entries of one bh (a tile needs no row alignment: the
order wanted is by e, and a tile is an e range). Key of an entry: its block b, with two pseudo
blocks: nb for an unused slot, nb + 1 for a padding lane past the end. The unused slots are
placed too, after every used entry, so ENTRIES is a full permutation of each bh's entries (no
unwritten word, every value in range) and ROWPTR[-1] = number of used slots.
  _tile_sort_kernel, grid (n_tiles, B·Hq): sorts the tile's keys b·E + i (i = position in the
      tile; tl.sort, a bitonic network in registers, O(E log² E)), stores them to SKEY, and the
      first entry of each run of equal b stores the run length to COUNTS (zeroed by torch).
  torch: INCL = inclusive cumsum of COUNTS (int32, deterministic), laid out as
      [B·Hq, nb, n_tiles] for used blocks, then [B·Hq, n_tiles] for the unused slots, so the
      flat order is (bh, block, tile): the start of (bh, b, tile) is INCL - COUNTS there.
  _scatter_kernel, same grid: reloads the sorted keys; an entry at sorted position i whose run
      starts at s has rank i - s among the tile's entries of its block, so its place is
      INCL - COUNTS + i - s; writes ENTRIES there (a run's writes are contiguous). The last
      tile of each bh copies its column of INCL into ROWPTR.
Memory: SKEY int32 [B·Hq, n_tiles·E] (about SEL's size) and COUNTS, INCL int32
[B·Hq·(nb + 1)·n_tiles], that is (nb + 1)/E words per entry: E grows with nb (up to 4096), so
the counts stay below the size of SEL up to nb ≈ 4k and reach 4× SEL at nb = 16k.
Cost: a sort of E keys per tile (E = 256 at nb <= 254: 36 compare-exchange stages per key), two
scans, and memory traffic SEL + 2·SKEY + ENTRIES + a few passes over the counts; no O(nb)
work per entry (only the per-tile counts, which are O(nb) per E entries).
When the counts would pass MAX_COUNTS_PER_ENTRY words per entry (many short documents with
small blocks), routed.routed_entries (a torch sort, same result) builds the index instead.
Run starts are found by scans with commutative combines (max / min of b·E + (E - 1 - i)), so
neither the argument order of the combine nor the scan direction can change the result.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from attn.common import alloc
from attn.dispatch import INTERPRET

INTERPRET_TILE = 16  # entries per tile under the interpreter: small, so tests cross many tiles
MIN_TILE = 256  # GPU: smallest tile (36 sort stages; counts <= (nb + 1)/256 words per entry)
MAX_TILE = 4096  # GPU: largest tile (16 keys per thread with 8 warps; sort stays in registers)
KEYS_PER_WARP = 128  # GPU: num_warps = E / 128, capped at MAX_WARPS (4 keys per thread)
MAX_WARPS = 8  # GPU: more warps only add cross-warp (shared memory) sort stages
MAX_COUNTS_PER_ENTRY = 4  # above: COUNTS larger than 4 words per entry, use the torch sort


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _min_combine(a, b):
    return tl.minimum(a, b)


@triton.jit
def _count_index(blk, pid_bh, tile, NB, N_BH, N_TILES):
    """Flat index of (bh, block, tile) in COUNTS / INCL: [B·Hq, nb, n_tiles] for blocks < nb,
    then the unused slots (pseudo block nb) as [B·Hq, n_tiles]; callers mask blk > nb."""
    used = (pid_bh * NB + blk) * N_TILES + tile
    unused = (N_BH * NB + pid_bh) * N_TILES + tile
    return tl.where(blk < NB, used, unused)


@triton.jit
def _run_start(sblk, E: tl.constexpr):
    """For sorted keys with block sblk at positions i: the position where i's run of equal
    blocks starts. max over i' <= i of sblk·E + (E - 1 - i') keeps the largest block (i's own:
    the keys are sorted) and, among its positions, the smallest i'."""
    i = tl.arange(0, E)
    v = tl.associative_scan(sblk * E + (E - 1 - i), 0, _max_combine)
    return E - 1 - v % E


@triton.jit
def _tile_sort_kernel(SEL, SKEY, COUNTS, N, NB, N_BH, N_TILES, E: tl.constexpr):
    tile = tl.program_id(0)  # tiles on axis 0 (up to 2**31 - 1; axis 1 stops at 65535)
    pid_bh = tl.program_id(1)
    i = tl.arange(0, E)
    e = tile * E + i
    sel = tl.load(SEL + pid_bh * N + e, mask=e < N, other=-1)
    # pseudo blocks: NB = unused slot (anything outside [0, NB) counts as unused), NB + 1 = pad
    blk = tl.where(e < N, tl.where((sel >= 0) & (sel < NB), sel, NB), NB + 1)
    skey = tl.sort(blk * E + i)
    tl.store(SKEY + (pid_bh * N_TILES + tile) * E + i, skey)
    sblk = skey // E
    start = _run_start(sblk, E)
    # min over i' >= i of the same value: the smallest block (i's own) at its largest position
    v_end = tl.associative_scan(sblk * E + (E - 1 - i), 0, _min_combine, reverse=True)
    end = E - 1 - v_end % E
    cidx = _count_index(sblk, pid_bh, tile, NB, N_BH, N_TILES)
    keep = (i == start) & (sblk <= NB)
    tl.store(COUNTS + tl.where(keep, cidx, 0), end - start + 1, mask=keep)


@triton.jit
def _scatter_kernel(SKEY, COUNTS, INCL, ENTRIES, ROWPTR, NB, N_BH, N_TILES, E: tl.constexpr):
    tile = tl.program_id(0)  # tiles on axis 0 (up to 2**31 - 1; axis 1 stops at 65535)
    pid_bh = tl.program_id(1)
    i = tl.arange(0, E)
    skey = tl.load(SKEY + (pid_bh * N_TILES + tile) * E + i)
    sblk = skey // E
    rank = i - _run_start(sblk, E)
    ok = sblk <= NB  # padding lanes (NB + 1) are not entries
    cidx = tl.where(ok, _count_index(sblk, pid_bh, tile, NB, N_BH, N_TILES), 0)
    # start of this (bh, block, tile) in ENTRIES: exclusive prefix = INCL - COUNTS
    first = tl.load(INCL + cidx, mask=ok, other=0) - tl.load(COUNTS + cidx, mask=ok, other=0)
    tl.store(ENTRIES + first + rank, tile * E + skey % E, mask=ok)
    if tile == N_TILES - 1:
        # ROWPTR[bh·nb + j + 1] = inclusive count through (bh, j, last tile); E blocks a step
        for j0 in range(0, NB, E):
            j = j0 + i
            r = tl.load(INCL + (pid_bh * NB + j) * N_TILES + N_TILES - 1, mask=j < NB, other=0)
            tl.store(ROWPTR + pid_bh * NB + 1 + j, r, mask=j < NB)
        if pid_bh == 0:
            tl.store(ROWPTR + i, tl.zeros([E], dtype=tl.int32), mask=i < 1)


def _tile_size(nb: int) -> int:
    if INTERPRET:
        return INTERPRET_TILE
    return min(MAX_TILE, max(MIN_TILE, triton.next_power_of_2(nb + 2)))


def routed_entries_triton(sel, nb: int, *, tile: int | None = None):
    """routed.routed_entries with Triton kernels (see the module docstring); `tile` (a power of
    two) overrides the entries per tile (tests). Every output word is written: ENTRIES past
    ROWPTR[-1] lists the unused slots."""
    B, hq, tq, nsel = sel.shape
    n_bh, n = B * hq, tq * nsel
    n_keys = n_bh * nb
    if n_keys + 1 >= 2 ** 31:
        raise ValueError(f"B*Hq*n_blocks={n_keys} must be < 2**31 (int32 sort keys)")
    if n_bh * n >= 2 ** 31:
        raise ValueError(f"B*Hq*Tq*NSEL={n_bh * n} must be < 2**31 (int32 entry positions)")
    if n_bh > 65535:
        raise ValueError(f"B*Hq={n_bh} must be <= 65535 (grid axis 1)")
    if sel.dtype != torch.int32:
        raise ValueError(f"sel must be int32, got {sel.dtype}")
    e = tile or _tile_size(nb)
    if e & (e - 1) or (nb + 2) * e >= 2 ** 31:
        raise ValueError(f"tile={e} must be a power of two with (nb + 2) * tile < 2**31")
    dev = sel.device
    entries = alloc.empty((n_bh * n,), torch.int32, dev)
    if n == 0:
        return torch.zeros(n_keys + 1, dtype=torch.int32, device=dev), entries
    n_tiles = triton.cdiv(n, e)
    if (nb + 1) * n_tiles > MAX_COUNTS_PER_ENTRY * n and tile is None:
        # many blocks per entry (long contexts cut in many short documents, small blocks): the
        # per-tile counts would outgrow the index itself; the sort-based version, same result
        from attn.moba.routed import routed_entries
        return routed_entries(sel, nb)
    if n_bh * (nb + 1) * n_tiles >= 2 ** 31 or n_bh * n_tiles * e >= 2 ** 31:
        raise ValueError(f"B*Hq*(n_blocks+1)*n_tiles={n_bh * (nb + 1) * n_tiles} and "
                         f"B*Hq*n_tiles*tile={n_bh * n_tiles * e} must be < 2**31 (int32 indices)")
    rowptr = alloc.empty((n_keys + 1,), torch.int32, dev)
    skey = alloc.empty((n_bh * n_tiles * e,), torch.int32, dev)
    counts = torch.zeros(n_bh * (nb + 1) * n_tiles, dtype=torch.int32, device=dev)
    warps = 1 if INTERPRET else min(MAX_WARPS, max(1, e // KEYS_PER_WARP))
    grid = (n_tiles, n_bh)
    _tile_sort_kernel[grid](sel.contiguous(), skey, counts, n, nb, n_bh, n_tiles, E=e,
                            num_warps=warps)
    incl = torch.cumsum(counts, 0, dtype=torch.int32)
    _scatter_kernel[grid](skey, counts, incl, entries, rowptr, nb, n_bh, n_tiles, E=e,
                          num_warps=warps)
    return rowptr, entries
