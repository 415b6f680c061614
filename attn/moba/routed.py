"""MoBA's routed part, block-centric: for every (block, batch·query head), the queries that chose
the block are gathered and attend the whole block (it lies strictly before them, so no mask).

Per-token routing makes the rows of a query tile choose different blocks; walking blocks
instead, the gathered rows of one block share its keys, so every key tile loaded serves only
rows that need it (no union of the tile's choices, no wasted rows beyond the last chunk).

Inverse index (once per forward, deterministic; index.py on the GPU, routed_entries below under
the interpreter and as its reference): ENTRIES int32 lists, per
(batch·head, block), the entries e = row·NSEL + slot with SEL[row, slot] == block, rows
ascending; ROWPTR [B·Hq·NB + 1] int32 offsets. The backward's dK/dV kernel reuses it.

Memory plan
  _routed_fwd_kernel : SPLIT programs per (block, batch·head), interleaving its entries BLOCK_M at
      a time (gathered Q rows [BLOCK_M, D]); streams the block's K, V in BLOCK_N chunks with an
      online softmax (fp32 acc [BLOCK_M, D]); writes the normalised partial output
      OP [B·Hq, Tq·NSEL, D] (in the input dtype: partial_dtype) and its log2-domain
      lse LP fp32 [B·Hq, Tq·NSEL] per entry.
  _routed_dq_kernel  : same walk with dO, lse, delta rows gathered; writes the partial
      DQP [B·Hq, Tq·NSEL, D] (unscaled Σ dS·K, partial_dtype) per entry.
The per-query-tile kernels (fwd.py) then add the own block and merge the NSEL partials of each
row: output through their lse, dQ by summation; every element has one writer, no atomics.
Transient memory: NSEL rows of D per query and head (OP in the forward, DQP in the backward),
2 bytes per element for 16-bit inputs: at 64k, H = 16, top-3 that is 512 MiB instead of the
1 GiB of fp32. On Hopper the forward runs through routed_gluon.py within its scope
(MOBA_ROUTED_IMPL=auto, the default; =triton forces the kernel below), the dQ through
routed_dq_gluon.py (MOBA_ROUTED_DQ_IMPL, the same settings).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from attn.common import alloc
from attn.common.jit import LOG2E, cvt, mma
from attn.common.launch import dot_precision
from attn.common.softmax import softmax_step
from attn.common.softmax_bwd import dq_acc
from attn.dispatch import INTERPRET
from attn.flash.common import gluon_chosen, impl_setting
from attn.moba.heads import token_stride

# MOBA_ROUTED_IMPL: the routed forward, auto (default: routed_gluon.py's warp-specialized kernel
# on Hopper within its scope, _routed_fwd_kernel below otherwise), triton or gluon
# (attn/flash/common.py's impl_setting)
ROUTED_IMPL = impl_setting("MOBA_ROUTED_IMPL", "auto")
# MOBA_ROUTED_DQ_IMPL: the routed dQ, auto (default: routed_dq_gluon.py's warp-specialized kernel
# on Hopper within its scope, _routed_dq_kernel below otherwise), triton or gluon
ROUTED_DQ_IMPL = impl_setting("MOBA_ROUTED_DQ_IMPL", "auto")


def partial_dtype(dtype: torch.dtype) -> torch.dtype:
    """Storage of the per-(row, slot) partials: the input dtype (fp32 stays exact; 16-bit inputs
    halve the transient memory, and the input's own mantissa keeps the merged error within twice
    the reference's rounding). The merge reads them back into fp32 accumulators."""
    return dtype


def routed_entries(sel, nb: int):
    """Inverse of SEL [B, Hq, Tq, NSEL]: (ROWPTR int32 [B·Hq·NB + 1], ENTRIES int32): the entries
    e = row·NSEL + slot of (batch·head bh) that chose block j are
    ENTRIES[ROWPTR[bh·NB + j] : ROWPTR[bh·NB + j + 1]]. One stable radix sort of int32 keys
    bh·NB + j (unused slots sort last), ROWPTR by binary search in the sorted keys."""
    B, hq, tq, nsel = sel.shape
    dev = sel.device
    n_keys = B * hq * nb
    if n_keys + 1 >= 2 ** 31:  # (B*Hq*Tq*(topk-1) < 2**31: checked by op._check)
        raise ValueError(f"B*Hq*n_blocks={n_keys} must be < 2**31 (int32 sort keys)")
    flat = sel.reshape(B * hq, tq * nsel)
    key = torch.arange(B * hq, device=dev, dtype=torch.int32)[:, None] * nb + flat
    key = torch.where(flat >= 0, key, n_keys).flatten()
    sorted_key, order = torch.sort(key, stable=True)
    bounds = torch.arange(n_keys + 1, device=dev, dtype=torch.int32)
    rowptr = torch.searchsorted(sorted_key, bounds, out_int32=True)
    # entries past rowptr[-1] (unused slots) are valid ids that no range reaches
    return rowptr, (order % (tq * nsel)).to(torch.int32)


@triton.jit
def chunk_scores(q, k_base, v_base, start_n, offs_n, end, qk_scale, STRIDE_KT: tl.constexpr,
                 HEAD_DIM: tl.constexpr, DOT_PREC: tl.constexpr, MASKED: tl.constexpr):
    """K, V rows kpos = start_n + offs_n of one KV head and the log2-domain scores
    q·kᵀ·qk_scale [M, BLOCK_N]. MASKED: keys at or past `end` load as 0 and score −inf (their
    exp2 is exactly 0); without it every key of the chunk must exist (no mask instructions).
    The chunk's first row is offset in int64 (Tk·Hkv·D may pass 2^31), the tile in int32."""
    kpos = start_n + offs_n
    row = tl.cast(start_n, tl.int64) * STRIDE_KT        # added to the scalar base pointers
    tile = offs_n[:, None] * STRIDE_KT + tl.arange(0, HEAD_DIM)[None, :]
    k_ptrs = k_base + row + tile
    v_ptrs = v_base + row + tile
    if MASKED:
        k_ok = kpos < end
        k = tl.load(k_ptrs, mask=k_ok[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=k_ok[:, None], other=0.0)
        s = tl.where(k_ok[None, :], mma(q, tl.trans(k), None, DOT_PREC) * qk_scale,
                     float("-inf"))
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
        s = mma(q, tl.trans(k), None, DOT_PREC) * qk_scale
    return k, v, s


@triton.jit
def _routed_fwd_kernel(Q, K, V, OP, LP, ROWPTR, ENTRIES, BLK_START, BLK_END, qk_scale, Tq, Tk, NB,
                       HQ: tl.constexpr, HKV: tl.constexpr, HEAD_DIM: tl.constexpr,
                       STRIDE_QT: tl.constexpr, STRIDE_KT: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NSEL: tl.constexpr,
                       SPLIT: tl.constexpr, EVEN: tl.constexpr, DOT_PREC: tl.constexpr):
    # the SPLIT programs of one (block, head) are neighbours on grid axis 0, so they run at the
    # same time and share the block's K/V in L2 (on a third grid axis they would run a whole
    # grid slice apart; docs/moba_notes.md)
    j = tl.program_id(0) // SPLIT
    z = tl.program_id(0) % SPLIT
    pid_bh = tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    hkv = h // (HQ // HKV)
    q_base = Q + b.to(tl.int64) * Tq * STRIDE_QT + h * HEAD_DIM
    k_base = K + b.to(tl.int64) * Tk * STRIDE_KT + hkv * HEAD_DIM
    v_base = V + b.to(tl.int64) * Tk * STRIDE_KT + hkv * HEAD_DIM
    ent_base = pid_bh.to(tl.int64) * Tq * NSEL
    beg = tl.load(ROWPTR + pid_bh.to(tl.int64) * NB + j)
    cnt = tl.load(ROWPTR + pid_bh.to(tl.int64) * NB + j + 1) - beg
    bs = tl.load(BLK_START + j)
    be = tl.load(BLK_END + j)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    i_first = z * BLOCK_M
    STEP: tl.constexpr = BLOCK_M * SPLIT
    # the gathered Q rows one chunk ahead, their entry ids two ahead: the next chunk's Q load is
    # in flight during this chunk's key loop instead of stalling its start
    # gathered rows: each row's offset in int64 (Tq·Hq·D may pass 2^31), the head dim added to
    # the row pointers
    ids_c = tl.load(ENTRIES + beg + i_first + offs_m, mask=i_first + offs_m < cnt, other=0)
    q_c = tl.load(q_base + (ids_c // NSEL).to(tl.int64)[:, None] * STRIDE_QT + offs_d[None, :],
                  mask=(i_first + offs_m < cnt)[:, None], other=0.0)
    ids_n = tl.load(ENTRIES + beg + i_first + STEP + offs_m, mask=i_first + STEP + offs_m < cnt,
                    other=0)
    for i0 in range(i_first, cnt, STEP):
        e_ok = i0 + offs_m < cnt
        ent = ids_c
        q = q_c
        q_c = tl.load(q_base + (ids_n // NSEL).to(tl.int64)[:, None] * STRIDE_QT + offs_d[None, :],
                      mask=(i0 + STEP + offs_m < cnt)[:, None], other=0.0)
        ids_c = ids_n
        ids_n = tl.load(ENTRIES + beg + i0 + 2 * STEP + offs_m,
                        mask=i0 + 2 * STEP + offs_m < cnt, other=0)
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        for start_n in range(bs, be, BLOCK_N):
            # EVEN: BLOCK_N divides the (complete) block, no key mask
            k, v, s = chunk_scores(q, k_base, v_base, start_n, offs_n, be, qk_scale, STRIDE_KT,
                                   HEAD_DIM, DOT_PREC, not EVEN)
            acc, m_i, l_i = softmax_step(s, v, acc, m_i, l_i, DOT_PREC)
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        tl.store(OP + (ent_base + ent[:, None]) * HEAD_DIM + offs_d[None, :],
                 cvt(acc / l_safe[:, None], OP.dtype.element_ty), mask=e_ok[:, None])
        tl.store(LP + ent_base + ent, m_i + tl.math.log2(l_safe), mask=e_ok)


@triton.jit
def _routed_dq_kernel(Q, K, V, DO, LSE, DELTA, DQP, ROWPTR, ENTRIES, BLK_START, BLK_END,
                      qk_scale, Tq, Tk, NB,
                      HQ: tl.constexpr, HKV: tl.constexpr, HEAD_DIM: tl.constexpr,
                      STRIDE_QT: tl.constexpr, STRIDE_KT: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NSEL: tl.constexpr,
                      SPLIT: tl.constexpr, EVEN: tl.constexpr, DOT_PREC: tl.constexpr):
    j = tl.program_id(0) // SPLIT  # (block, split) pairs on axis 0: see the forward
    z = tl.program_id(0) % SPLIT
    pid_bh = tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    hkv = h // (HQ // HKV)
    q_base = Q + b.to(tl.int64) * Tq * STRIDE_QT + h * HEAD_DIM
    do_base = DO + b.to(tl.int64) * Tq * STRIDE_QT + h * HEAD_DIM
    k_base = K + b.to(tl.int64) * Tk * STRIDE_KT + hkv * HEAD_DIM
    v_base = V + b.to(tl.int64) * Tk * STRIDE_KT + hkv * HEAD_DIM
    row_base = pid_bh.to(tl.int64) * Tq
    ent_base = row_base * NSEL
    beg = tl.load(ROWPTR + pid_bh.to(tl.int64) * NB + j)
    cnt = tl.load(ROWPTR + pid_bh.to(tl.int64) * NB + j + 1) - beg
    bs = tl.load(BLK_START + j)
    be = tl.load(BLK_END + j)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    i_first = z * BLOCK_M
    STEP: tl.constexpr = BLOCK_M * SPLIT
    # entry ids two row chunks ahead (the gathered rows' loads then wait on one latency, not
    # two); the rows themselves are not prefetched as in the forward: that costs registers here
    # (docs/moba_notes.md)
    ids_c = tl.load(ENTRIES + beg + i_first + offs_m, mask=i_first + offs_m < cnt, other=0)
    ids_n = tl.load(ENTRIES + beg + i_first + STEP + offs_m, mask=i_first + STEP + offs_m < cnt,
                    other=0)
    for i0 in range(i_first, cnt, STEP):
        e_ok = i0 + offs_m < cnt
        ent = ids_c
        rows = ent // NSEL
        # gathered rows: int64 row offsets (Tq·Hq·D may pass 2^31)
        r_off = rows.to(tl.int64)[:, None] * STRIDE_QT
        q = tl.load(q_base + r_off + offs_d[None, :], mask=e_ok[:, None], other=0.0)
        do = tl.load(do_base + r_off + offs_d[None, :], mask=e_ok[:, None], other=0.0)
        lse2 = tl.load(LSE + row_base + rows, mask=e_ok, other=0.0) * LOG2E
        delta = tl.load(DELTA + row_base + rows, mask=e_ok, other=0.0)
        ids_c = ids_n
        ids_n = tl.load(ENTRIES + beg + i0 + 2 * STEP + offs_m,
                        mask=i0 + 2 * STEP + offs_m < cnt, other=0)
        dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        for start_n in range(bs, be, BLOCK_N):
            k, v, s = chunk_scores(q, k_base, v_base, start_n, offs_n, be, qk_scale, STRIDE_KT,
                                   HEAD_DIM, DOT_PREC, not EVEN)
            p = tl.math.exp2(s - lse2[:, None])
            dq, _ = dq_acc(dq, p, k, v, do, delta, DOT_PREC)
        tl.store(DQP + (ent_base + ent[:, None]) * HEAD_DIM + offs_d[None, :],
                 cvt(dq, DQP.dtype.element_ty), mask=e_ok[:, None])


# (BLOCK_M, BLOCK_N, warps, stages) on the GPU: the sweep's fastest (docs/moba_notes.md); 128
# gathered rows per chunk halve the K/V reloads of a block against 64
GPU_ROUTED = (128, 64, 8, 4)
INTERP_ROUTED = (16, 16, 4, 1)  # interpreter: small tiles, many chunk edges
# programs per (block, head): program z takes row chunks z, z + SPLIT, ... Early blocks are
# candidates for more queries (block 0 for all of them), so their row lists are the longest;
# splitting evens out the grid (programs without work exit at once)
GPU_SPLIT = 4
INTERP_SPLIT = 2  # exercises the split in the tests


def _cfg(dtype, d):
    if INTERPRET:
        return INTERP_ROUTED
    bm, bn, w, s = GPU_ROUTED
    # fp32 tiles take twice the bytes (GPU tests only)
    return (64, 32, 8, 2) if dtype == torch.float32 and d == 128 else (bm, bn, w, s)


def even_blocks(block_size, block_n: int) -> bool:
    """Routed blocks are always complete (an earlier block of the row's own document), so a key
    chunk that divides block_size never reaches past the block's end."""
    return block_size is not None and block_size % block_n == 0


def _routed_gluon(q, k, block_size, has_docs) -> bool:
    """Whether the routed forward runs routed_gluon.py's kernel (MOBA_ROUTED_IMPL); ValueError
    when it is demanded outside its scope."""
    def scope():
        from attn.moba.routed_gluon import routed_scope_error
        return routed_scope_error(q, k, block_size, has_docs)
    return gluon_chosen("MOBA_ROUTED_IMPL", ROUTED_IMPL, q, "MoBA Gluon routed forward", scope)


def routed_fwd(q, k, v, index, table, scale_log2, nsel: int, block_size=None, has_docs=True):
    """(OP, LP): normalised partial output and log2 lse of every (row, slot) entry. block_size
    (None: unknown) lets the kernel drop the key mask when its key chunk divides the block;
    has_docs (unknown: True) whether the blocks restart at documents. q, k, v may be a head
    piece's views (heads.py), index its slice."""
    B, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    _, _, blk_start, blk_end = table
    nb = blk_start.numel()
    rowptr, entries = index
    op = alloc.empty((B * hq, tq * nsel, d), partial_dtype(q.dtype), q.device)
    lp = alloc.empty((B * hq, tq * nsel), torch.float32, q.device)
    if _routed_gluon(q, k, block_size, has_docs):
        from attn.moba.routed_gluon import routed_fwd_gluon
        return routed_fwd_gluon(q, k, v, index, nb, nsel, scale_log2, block_size, op, lp)
    bm, bn, w, s = _cfg(q.dtype, d)
    split = INTERP_SPLIT if INTERPRET else GPU_SPLIT
    _routed_fwd_kernel[(nb * split, B * hq)](
        q, k, v, op, lp, rowptr, entries, blk_start, blk_end, scale_log2, tq, tk, nb, HQ=hq,
        HKV=hkv, HEAD_DIM=d, STRIDE_QT=token_stride(q), STRIDE_KT=token_stride(k, v),
        BLOCK_M=bm, BLOCK_N=bn, NSEL=nsel, SPLIT=split,
        EVEN=even_blocks(block_size, bn), DOT_PREC=dot_precision(q.dtype), num_warps=w,
        num_stages=s)
    return op, lp


def _routed_dq_gluon(q, k, block_size, has_docs) -> bool:
    """Whether the routed dQ runs routed_dq_gluon.py's kernel (MOBA_ROUTED_DQ_IMPL); ValueError
    when it is demanded outside its scope."""
    def scope():
        from attn.moba.routed_gluon import routed_scope_error
        return routed_scope_error(q, k, block_size, has_docs)
    return gluon_chosen("MOBA_ROUTED_DQ_IMPL", ROUTED_DQ_IMPL, q, "MoBA Gluon routed dQ", scope)


def routed_dq(do, q, k, v, lse, delta, index, table, scale_log2, nsel: int, block_size=None,
              has_docs=True):
    """DQP: the unscaled dQ share (Σ dS·K) of every (row, slot) entry's routed block; has_docs
    (unknown: True) whether the blocks restart at documents."""
    B, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    _, _, blk_start, blk_end = table
    nb = blk_start.numel()
    rowptr, entries = index
    dqp = alloc.empty((B * hq, tq * nsel, d), partial_dtype(q.dtype), q.device)
    if _routed_dq_gluon(q, k, block_size, has_docs):
        from attn.moba.routed_dq_gluon import routed_dq_gluon
        return routed_dq_gluon(do, q, k, v, lse, delta, index, nb, nsel, scale_log2, block_size,
                               dqp)
    bm, bn, w, s = _cfg(q.dtype, d)
    split = INTERP_SPLIT if INTERPRET else GPU_SPLIT
    _routed_dq_kernel[(nb * split, B * hq)](
        q, k, v, do, lse, delta, dqp, rowptr, entries, blk_start, blk_end, scale_log2, tq, tk,
        nb, HQ=hq, HKV=hkv, HEAD_DIM=d, STRIDE_QT=token_stride(q, do),
        STRIDE_KT=token_stride(k, v), BLOCK_M=bm, BLOCK_N=bn, NSEL=nsel, SPLIT=split,
        EVEN=even_blocks(block_size, bn), DOT_PREC=dot_precision(q.dtype), num_warps=w,
        num_stages=s)
    return dqp
