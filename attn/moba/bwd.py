"""MoBA backward: delta, dQ (per query tile, attn/moba/fwd.py) and dK/dV (per key tile).

dK/dV needs, for every key, the queries that attend it: (a) the rows of its own block at or
after it (a contiguous row range), (b) the rows that routed to its block, per query head. (b) is
the forward's inverse index (routed.py: for each (batch, query head, block) the entries
row·NSEL + slot that chose it, rows ascending; CSR ROWPTR [B·Hq·NB + 1], ENTRIES int32).

Memory plan (_dkdv_kernel): one program = BLOCK_N keys of one (batch, KV head); K, V tiles and
fp32 dK, dV accumulators [BLOCK_N, D] stay in registers; for each query head of the GQA group
(shared K/V read once, no repeat_interleave) it streams (a) the own-block query rows and (b) the
gathered routed rows of every block the key tile touches, BLOCK_M rows at a time (Q, dO
[BLOCK_M, D] plus lse, delta [BLOCK_M]); writes dK, dV once. Deterministic: every output element
has exactly one writer, no atomics anywhere in the backward.
With P = exp2(s2 − lse2) from the saved lse: dV = Pᵀ dO, dS = P ⊙ (dO Vᵀ − delta),
dK = scale · dSᵀ Q, dQ = scale · dS K, per tile pair by attn/common/softmax_bwd.py (dkdv_probs
with MASK_BOUNDS: each key's window of query positions, and dkdv_acc; dQ: dq_acc, in fwd.py and
routed.py); the row walks (own block, gathered routed rows) are MoBA's own. No gradient flows
through the gate (the selection is piecewise constant), as in the paper and in ref.py (its
top-k indices carry no gradient). On Hopper, within its scope, dK/dV runs through
dkdv_gluon.py's warp-specialized kernel instead (MOBA_DKDV_IMPL=auto, the default; same walk,
same result up to rounding); =triton forces the kernel here, =gluon demands the Gluon one.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from attn.common import alloc
from attn.common.jit import LOG2E, LOG2E_F, cvt
from attn.common.launch import dot_precision
from attn.common.softmax import bwd_delta
from attn.common.softmax_bwd import MASK_BOUNDS, MASK_NONE, dkdv_acc, dkdv_probs
from attn.dispatch import INTERPRET
from attn.flash.common import gluon_chosen, impl_setting
from attn.moba.fwd import dq_triton
from attn.moba.routed import even_blocks

# MOBA_DKDV_IMPL: the dK/dV kernel, auto (default: dkdv_gluon.py's warp-specialized kernel on
# Hopper within its scope, _dkdv_kernel below otherwise), triton or gluon (attn/flash/common.py's
# impl_setting)
DKDV_IMPL = impl_setting("MOBA_DKDV_IMPL", "auto")


@triton.jit
def _dkdv_rows(dk, dv, k, v, rows, r_ok, qpos, lo, hi, q_base, do_base, lse_ptr, delta_ptr,
               qk_scale, STRIDE_QT: tl.constexpr, HEAD_DIM: tl.constexpr,
               DOT_PREC: tl.constexpr, FULL: tl.constexpr = False):
    """Accumulate one chunk of query rows (any rows: gathered or contiguous) into dK, dV of the
    key tile; key s and row r pair up when lo[s] <= qpos[r] <= hi[s] and r_ok[r]. FULL: every
    key of the tile pairs with every valid row (lo, hi unused); padding rows get lse = +inf,
    so their P is exactly 0 without a mask."""
    offs_d = tl.arange(0, HEAD_DIM)
    # any rows (gathered): int64 row offsets (Tq·Hq·D may pass 2^31)
    r_off = rows.to(tl.int64)[:, None] * STRIDE_QT
    q = tl.load(q_base + r_off + offs_d[None, :], mask=r_ok[:, None], other=0.0)
    do = tl.load(do_base + r_off + offs_d[None, :], mask=r_ok[:, None], other=0.0)
    lse2 = tl.load(lse_ptr + rows, mask=r_ok, other=float("inf")) * LOG2E
    delta = tl.load(delta_ptr + rows, mask=r_ok, other=0.0)
    # q_offset 0: qpos are positions already; SEG_START, window: unused by these masks;
    # MASK_FIRST: the mask before the exponentials, the order this kernel was tuned with
    if FULL:
        p_t = dkdv_probs(k, q, lse2, qpos, r_ok, 0, lo, hi, lse_ptr, 0, qk_scale, MASK_NONE,
                         False, False, DOT_PREC)
    else:
        p_t = dkdv_probs(k, q, lse2, qpos, r_ok, 0, lo, hi, lse_ptr, 0, qk_scale, MASK_BOUNDS,
                         False, False, DOT_PREC, True)
    dk, dv = dkdv_acc(dk, dv, p_t, q, do, v, delta, DOT_PREC)
    return dk, dv


@triton.jit
def _dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, KBLK, BLK_END, ROWPTR, ENTRIES, scale,
                 qk_scale, q_offset, Tq, Tk, NB,
                 HQ: tl.constexpr, HKV: tl.constexpr, HEAD_DIM: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NSEL: tl.constexpr,
                 ROUTED: tl.constexpr, ALIGNED: tl.constexpr, DOT_PREC: tl.constexpr):
    """ALIGNED: every key tile lies inside one block (no documents, BLOCK_N divides the block
    size), so a routed row pairs with every key of the tile."""
    start_n = tl.program_id(0) * BLOCK_N
    pid_bh = tl.program_id(1)
    b = pid_bh // HKV
    hkv = pid_bh % HKV
    GROUP: tl.constexpr = HQ // HKV
    STRIDE_QT: tl.constexpr = HQ * HEAD_DIM
    STRIDE_KT: tl.constexpr = HKV * HEAD_DIM
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    n_ok = offs_n < Tk
    # int64 base of the key tile (Tk·Hkv·D may pass 2^31), int32 offsets inside it
    kv_off = (b.to(tl.int64) * Tk + start_n) * STRIDE_KT + hkv * HEAD_DIM \
        + (tl.arange(0, BLOCK_N)[:, None] * STRIDE_KT + offs_d[None, :])
    k = tl.load(K + kv_off, mask=n_ok[:, None], other=0.0)
    v = tl.load(V + kv_off, mask=n_ok[:, None], other=0.0)
    kblk = tl.load(KBLK + offs_n, mask=n_ok, other=-1)
    kend = tl.load(BLK_END + kblk, mask=n_ok, other=0)     # exclusive end of the key's block
    # (a) own block: rows at positions kpos .. kend-1 (a padding key gets the empty [BIG, -1])
    own_lo = tl.where(n_ok, offs_n, 2 ** 30)
    own_hi = tl.where(n_ok, kend - 1, -1)
    r_lo = tl.maximum(start_n - q_offset, 0)
    r_hi = tl.minimum(tl.max(kend, 0) - q_offset, Tq)       # exclusive
    # ALIGNED (one block per tile): own rows from the tile's last key on see every key of the tile
    # (same block, later position), so whole chunks of them from r_mid on need no mask
    r_mid = r_hi
    if ALIGNED:
        r_mid = tl.minimum(tl.maximum(r_lo + tl.cdiv(start_n + BLOCK_N - 1 - q_offset - r_lo,
                                                     BLOCK_M) * BLOCK_M, r_lo), r_hi)
    # (b) routed rows: blocks touched by this key tile
    j_lo = tl.min(tl.where(n_ok, kblk, NB), 0)
    j_hi = tl.max(kblk, 0) + 1

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    for g in range(GROUP):
        h = hkv * GROUP + g
        bh = (b * HQ + h).to(tl.int64)
        q_base = Q + b.to(tl.int64) * Tq * STRIDE_QT + h * HEAD_DIM
        do_base = DO + b.to(tl.int64) * Tq * STRIDE_QT + h * HEAD_DIM
        lse_ptr = LSE + bh * Tq
        delta_ptr = DELTA + bh * Tq
        for m0 in range(r_lo, r_mid, BLOCK_M):
            rows = m0 + offs_m
            r_ok = rows < r_hi
            dk, dv = _dkdv_rows(dk, dv, k, v, rows, r_ok, q_offset + rows, own_lo,
                                own_hi, q_base, do_base, lse_ptr, delta_ptr, qk_scale,
                                STRIDE_QT, HEAD_DIM, DOT_PREC)
        for m0 in range(r_mid, r_hi, BLOCK_M):  # ALIGNED only: rows that see the whole tile
            rows = m0 + offs_m
            r_ok = rows < r_hi
            dk, dv = _dkdv_rows(dk, dv, k, v, rows, r_ok, q_offset + rows, own_lo,
                                own_hi, q_base, do_base, lse_ptr, delta_ptr, qk_scale,
                                STRIDE_QT, HEAD_DIM, DOT_PREC, True)
        if ROUTED:
            for j in range(j_lo, j_hi):
                beg = tl.load(ROWPTR + bh * NB + j)
                cnt = tl.load(ROWPTR + bh * NB + j + 1) - beg
                in_j = kblk == j
                # a routed row sees the whole (earlier, complete) block: window [0, BIG)
                lo = tl.where(in_j, 0, 2 ** 30)
                hi = tl.where(in_j, 2 ** 30, -1)
                # row ids are loaded in the iteration that uses them: one chunk ahead, as the
                # routed kernels do, is slower here (docs/moba_notes.md)
                for i0 in range(0, cnt, BLOCK_M):
                    r_ok = i0 + offs_m < cnt
                    rows = tl.load(ENTRIES + beg + i0 + offs_m, mask=r_ok, other=0) // NSEL
                    dk, dv = _dkdv_rows(dk, dv, k, v, rows, r_ok, rows, lo, hi, q_base,
                                        do_base, lse_ptr, delta_ptr, qk_scale, STRIDE_QT,
                                        HEAD_DIM, DOT_PREC, ALIGNED)
    tl.store(DK + kv_off, cvt(dk * scale, DK.dtype.element_ty), mask=n_ok[:, None])
    tl.store(DV + kv_off, cvt(dv, DV.dtype.element_ty), mask=n_ok[:, None])


# (BLOCK_M, BLOCK_N, warps, stages): the sweep's fastest (docs/moba_notes.md); 32-row chunks, as
# the gathered rows of a block are mostly few per key tile
GPU_DKDV = (32, 64, 4, 2)
INTERP_DKDV = (16, 16, 4, 1)


def _dkdv_gluon(q, k, block_size, has_docs, q_offset, routed) -> bool:
    """Whether dK/dV runs dkdv_gluon.py's kernel (MOBA_DKDV_IMPL); ValueError when it is
    demanded outside its scope."""
    def scope():
        if not routed:
            return "the MoBA Gluon dK/dV kernel needs routed blocks (topk >= 2)"
        from attn.moba.dkdv_gluon import dkdv_scope_error
        return dkdv_scope_error(q, k, block_size, has_docs, q_offset)
    return gluon_chosen("MOBA_DKDV_IMPL", DKDV_IMPL, q, "MoBA Gluon dK/dV kernel", scope)


def bwd_triton(do, q, k, v, o, lse, sel, table, scale, q_offset, index=None, block_size=None,
               has_docs=True):
    """(dq, dk, dv) for MoBA given the forward's o, lse, selection and its inverse index
    (routed.routed_entries; None when nothing is routed, topk == 1). block_size / has_docs
    (unknown: None / True) only enable mask-free paths."""
    B, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    kblk, _, blk_start, blk_end = table
    nb = blk_start.numel()
    delta = bwd_delta(o, do)
    dq = dq_triton(do, q, k, v, lse, delta, sel, table, scale, q_offset, index, block_size,
                   has_docs)
    routed = index is not None
    if _dkdv_gluon(q, k, block_size, has_docs, q_offset, routed):
        from attn.moba.dkdv_gluon import dkdv_gluon
        dk, dv = dkdv_gluon(do, q, k, v, lse, delta, index, nb, sel.shape[-1], scale, block_size)
        return dq, dk, dv
    rowptr, entries = index if routed else (blk_start, blk_start)  # dummies, never read
    dk = alloc.empty(k.shape, k.dtype, k.device)
    dv = alloc.empty(v.shape, v.dtype, v.device)
    bm, bn, w, s = INTERP_DKDV if INTERPRET else GPU_DKDV
    if not INTERPRET and q.dtype == torch.float32 and d == 128:
        bm = 32
    _dkdv_kernel[(triton.cdiv(tk, bn), B * hkv)](
        q, k, v, do, lse, delta, dk, dv, kblk, blk_end, rowptr, entries, scale, scale * LOG2E_F,
        q_offset, tq, tk, nb, HQ=hq, HKV=hkv, HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn,
        NSEL=sel.shape[-1], ROUTED=routed,
        ALIGNED=not has_docs and even_blocks(block_size, bn),
        DOT_PREC=dot_precision(q.dtype),
        num_warps=w, num_stages=s)
    return dq, dk, dv
