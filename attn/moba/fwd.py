"""MoBA per-query-tile kernels: the own block (causal) merged with the routed partials, for the
forward (o, lse) and for dQ.

Strategy: per-token routing is split in two so that no key is loaded for a row that does not
attend it. The routed blocks are done block-centric (routed.py: for each chosen block, the
gathered rows that chose it attend it in full, writing a normalised partial output and its lse
per (row, slot), or a partial dQ); this file does the rest per tile of BLOCK_M consecutive query
rows of one (batch, query head): the tile's own-block keys [min own-block start, last row] with
the causal mask of each row ([own block start, row position]; a tile may span several blocks
and documents), then the NSEL partials of each row (slots with SEL = −1 are skipped). The
forward merges the partials into the online softmax through their lse (the key sets are
disjoint: chosen blocks lie strictly before the row's own block), so the result is exactly one
softmax over the union; dQ adds the partial sums before the single scale and cast.

Memory plan (forward): registers Q tile [BLOCK_M, D] (input dtype), fp32 accumulator
[BLOCK_M, D], running max / sum [BLOCK_M]; streams K, V chunks [BLOCK_N, D] of the row's KV head
(GQA: shared K/V, no copies), then the NSEL partial rows [BLOCK_M, D] fp32; writes O once and
lse once (fp32, natural log). dQ: Q, dO, lse, delta rows resident, fp32 dQ accumulator, writes
dQ once. Scores in the log2 domain (s2 = q·k · scale · log2 e), so every exponential is exp2.

On Hopper the tile step (routed blocks, no documents, 128-aligned Tq, q_offset and block size)
runs tile_gluon.py's persistent warp-specialized forward instead (MOBA_TILE_IMPL); its dQ
counterpart, tile_dq_gluon.py, likewise (MOBA_TILE_DQ_IMPL).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from attn.common import alloc
from attn.common.jit import LN2, LOG2E, LOG2E_F, cvt
from attn.common.launch import dot_precision
from attn.common.softmax import softmax_step
from attn.common.softmax_bwd import dq_acc
from attn.dispatch import INTERPRET
from attn.flash.common import gluon_chosen, impl_setting
from attn.moba.heads import pieces_of, token_stride
from attn.moba.routed import chunk_scores, routed_dq, routed_fwd

# MOBA_TILE_IMPL: the forward's tile kernel when blocks are routed, auto (default: tile_gluon.py's
# persistent warp-specialized kernel on Hopper within its scope, _tile_kernel below otherwise),
# triton or gluon (attn/flash/common.py's impl_setting)
TILE_IMPL = impl_setting("MOBA_TILE_IMPL", "auto")
# MOBA_TILE_DQ_IMPL: the same choice for the backward's tile kernel (dQ; tile_dq_gluon.py)
TILE_DQ_IMPL = impl_setting("MOBA_TILE_DQ_IMPL", "auto")

BIG = tl.constexpr(2 ** 30)  # a key position past every key: empty windows


@triton.jit
def _own_scores(q, k_base, v_base, start_n, offs_n, end, lo, hi, qk_scale,
                STRIDE_KT: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PREC: tl.constexpr,
                MASKED: tl.constexpr):
    """K, V and scores of the own-block key chunk start_n + offs_n; MASKED: row r sees keys
    lo[r] <= s <= hi[r] (and s < end), the others score −inf."""
    k, v, s = chunk_scores(q, k_base, v_base, start_n, offs_n, end, qk_scale, STRIDE_KT,
                           HEAD_DIM, DOT_PREC, MASKED)
    if MASKED:
        kpos = start_n + offs_n
        s = tl.where((kpos[None, :] >= lo[:, None]) & (kpos[None, :] <= hi[:, None]), s,
                     float("-inf"))
    return k, v, s


@triton.jit
def _fwd_chunks(acc, l_i, m_i, q, k_base, v_base, start, end, lo, hi, qk_scale,
                STRIDE_KT: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                DOT_PREC: tl.constexpr, MASKED: tl.constexpr):
    """Keys [start, end) in BLOCK_N chunks; MASKED=False: whole chunks every row sees."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(start, end, BLOCK_N):
        k, v, s = _own_scores(q, k_base, v_base, start_n, offs_n, end, lo, hi, qk_scale, STRIDE_KT,
                              HEAD_DIM, DOT_PREC, MASKED)
        acc, m_i, l_i = softmax_step(s, v, acc, m_i, l_i, DOT_PREC)
    return acc, l_i, m_i


@triton.jit
def _dq_chunks(dq, q, do, lse2, delta, k_base, v_base, start, end, lo, hi, qk_scale,
               STRIDE_KT: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
               DOT_PREC: tl.constexpr, MASKED: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(start, end, BLOCK_N):
        k, v, s = _own_scores(q, k_base, v_base, start_n, offs_n, end, lo, hi, qk_scale, STRIDE_KT,
                              HEAD_DIM, DOT_PREC, MASKED)
        p = tl.math.exp2(s - lse2[:, None])  # masked scores are −inf: p = 0 exactly
        dq, _ = dq_acc(dq, p, k, v, do, delta, DOT_PREC)
    return dq


@triton.jit
def _merge_partials(acc, l_i, m_i, SEL, OP, LP, ent, m_ok, HEAD_DIM: tl.constexpr,
                    NSEL: tl.constexpr):
    """Online-softmax merge of each chosen block's normalised partial o_p with weight 2^lp
    (log2 domain) into (acc, l_i, m_i); slots with SEL = −1 add nothing."""
    offs_d = tl.arange(0, HEAD_DIM)
    for slot in tl.static_range(NSEL):
        ok = m_ok & (tl.load(SEL + ent + slot, mask=m_ok, other=-1) >= 0)
        lp = tl.load(LP + ent + slot, mask=ok, other=0.0)
        lp = tl.where(ok, lp, -1.0e30)
        m_new = tl.maximum(m_i, lp)
        alpha = tl.math.exp2(m_i - m_new)
        w = tl.where(ok, tl.math.exp2(lp - m_new), 0.0)
        o_p = tl.load(OP + (ent + slot)[:, None] * HEAD_DIM + offs_d[None, :],
                      mask=ok[:, None], other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + w[:, None] * o_p
        l_i = l_i * alpha + w
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _sum_partials(dq, SEL, DQP, ent, m_ok, HEAD_DIM: tl.constexpr, NSEL: tl.constexpr):
    """dq + the partial dQ sums of the row's chosen blocks."""
    offs_d = tl.arange(0, HEAD_DIM)
    for slot in tl.static_range(NSEL):
        ok = m_ok & (tl.load(SEL + ent + slot, mask=m_ok, other=-1) >= 0)
        dq += tl.load(DQP + (ent + slot)[:, None] * HEAD_DIM + offs_d[None, :],
                      mask=ok[:, None], other=0.0).to(tl.float32)
    return dq


@triton.jit
def _tile_kernel(Q, K, V, O, LSE, DO, DELTA, DQ, SEL, OP, LP, KBLK, BLK_START, scale, qk_scale,
                 q_offset, Tq, Tk,
                 HQ: tl.constexpr, HKV: tl.constexpr, HEAD_DIM: tl.constexpr,
                 STRIDE_QT: tl.constexpr, STRIDE_KT: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NSEL: tl.constexpr,
                 ROUTED: tl.constexpr, DQ_MODE: tl.constexpr, DOT_PREC: tl.constexpr):
    """Own block of BLOCK_M query rows, merged with the rows' routed partials (routed.py).
    DQ_MODE=False: forward, OP/LP = normalised partial outputs and their log2 lse; writes O, LSE.
    DQ_MODE=True: dQ, OP = partial dQ sums (LP unused); reads LSE, DELTA, DO; writes DQ.
    STRIDE_QT / STRIDE_KT: token strides of Q, O, DO, DQ / K, V (heads.py's pieces are views
    of the full tensors)."""
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M  # long rows first
    pid_bh = tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    hkv = h // (HQ // HKV)
    k_base = K + b.to(tl.int64) * Tk * STRIDE_KT + hkv * HEAD_DIM
    v_base = V + b.to(tl.int64) * Tk * STRIDE_KT + hkv * HEAD_DIM
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_ok = offs_m < Tq
    qpos = q_offset + offs_m
    # int64 base of the query tile (Tq·Hq·D may pass 2^31), int32 offsets inside it
    q_off = (b.to(tl.int64) * Tq + start_m) * STRIDE_QT + h * HEAD_DIM \
        + (tl.arange(0, BLOCK_M)[:, None] * STRIDE_QT + offs_d[None, :])
    q = tl.load(Q + q_off, mask=m_ok[:, None], other=0.0)
    own_start = tl.load(BLK_START + tl.load(KBLK + qpos, mask=m_ok, other=0), mask=m_ok,
                        other=BIG)
    own_start = tl.where(m_ok, own_start, BIG)
    own_lo = tl.min(own_start, 0)
    own_hi = q_offset + tl.minimum(start_m + BLOCK_M, Tq)  # exclusive
    # keys [own_lo, own_mid) in whole chunks are seen by every row when all rows share one own
    # block (starting at own_lo) and the chunk ends at or before the first row: no mask there
    first_row = q_offset + start_m
    own_mid = tl.where(tl.max(tl.where(m_ok, own_start, -1), 0) == own_lo,
                       own_lo + ((first_row + 1 - own_lo) // BLOCK_N) * BLOCK_N, own_lo)
    ent = (pid_bh.to(tl.int64) * Tq + offs_m) * NSEL       # entry of (row, slot 0)

    if DQ_MODE:
        do = tl.load(DO + q_off, mask=m_ok[:, None], other=0.0)
        lse2 = tl.load(LSE + pid_bh.to(tl.int64) * Tq + offs_m, mask=m_ok, other=0.0) * LOG2E
        delta = tl.load(DELTA + pid_bh.to(tl.int64) * Tq + offs_m, mask=m_ok, other=0.0)
        dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        if ROUTED:
            # partials first: their loads then overlap the own-block loop (the forward's merge
            # is faster last; docs/moba_notes.md)
            dq = _sum_partials(dq, SEL, OP, ent, m_ok, HEAD_DIM, NSEL)
        dq = _dq_chunks(dq, q, do, lse2, delta, k_base, v_base, own_lo, own_mid, own_start, qpos,
                        qk_scale, STRIDE_KT, BLOCK_N, HEAD_DIM, DOT_PREC, False)
        dq = _dq_chunks(dq, q, do, lse2, delta, k_base, v_base, own_mid, own_hi, own_start, qpos,
                        qk_scale, STRIDE_KT, BLOCK_N, HEAD_DIM, DOT_PREC, True)
        tl.store(DQ + q_off, cvt(dq * scale, DQ.dtype.element_ty), mask=m_ok[:, None])
    else:
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30  # finite: masked chunks give p = 0
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        acc, l_i, m_i = _fwd_chunks(acc, l_i, m_i, q, k_base, v_base, own_lo, own_mid, own_start,
                                    qpos, qk_scale, STRIDE_KT, BLOCK_N, HEAD_DIM, DOT_PREC, False)
        acc, l_i, m_i = _fwd_chunks(acc, l_i, m_i, q, k_base, v_base, own_mid, own_hi, own_start,
                                    qpos, qk_scale, STRIDE_KT, BLOCK_N, HEAD_DIM, DOT_PREC, True)
        if ROUTED:
            acc, l_i, m_i = _merge_partials(acc, l_i, m_i, SEL, OP, LP, ent, m_ok, HEAD_DIM, NSEL)
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)  # only padding rows (never stored) have l == 0
        tl.store(O + q_off, cvt(acc / l_safe[:, None], O.dtype.element_ty), mask=m_ok[:, None])
        tl.store(LSE + pid_bh.to(tl.int64) * Tq + offs_m, (m_i + tl.math.log2(l_safe)) * LN2,
                 mask=m_ok)


# (BLOCK_M, BLOCK_N, warps, stages) on the GPU: the sweep's fastest (docs/moba_notes.md; 4 warps,
# 64-row tiles, 3 stages help the forward only)
GPU_CFG = {"fwd": (64, 64, 4, 3), "dq": (64, 64, 4, 2)}
INTERP_CFG = (16, 16, 4, 1)


def _cfg(kind, dtype, d):
    if INTERPRET:
        return INTERP_CFG
    bm, bn, w, s = GPU_CFG[kind]
    if dtype == torch.float32 and d == 128:
        bn = 32  # fp32 tiles take twice the bytes
    return bm, bn, w, s


def _tile_gluon(q, k, block_size, q_offset, has_docs) -> bool:
    """Whether the forward's tile step runs tile_gluon.py's kernel (MOBA_TILE_IMPL); ValueError
    when it is demanded outside its scope."""
    def scope():
        from attn.moba.tile_gluon import tile_scope_error
        return tile_scope_error(q, k, block_size, q_offset, has_docs)
    return gluon_chosen("MOBA_TILE_IMPL", TILE_IMPL, q, "MoBA Gluon tile forward", scope)


def _tile_dq_gluon(q, k, block_size, q_offset, has_docs) -> bool:
    """Whether the backward's tile step runs tile_dq_gluon.py's kernel (MOBA_TILE_DQ_IMPL)."""
    def scope():
        from attn.moba.tile_gluon import tile_scope_error
        why = tile_scope_error(q, k, block_size, q_offset, has_docs)
        return None if why is None else why.replace("tile forward", "tile dQ")
    return gluon_chosen("MOBA_TILE_DQ_IMPL", TILE_DQ_IMPL, q, "MoBA Gluon tile dQ", scope)


def fwd_triton(q, k, v, sel, table, scale, q_offset, index=None, block_size=None,
               has_docs=True):
    """o [B, Tq, Hq, D] (q.dtype), lse [B, Hq, Tq] fp32, given the selection SEL and its inverse
    index (routed.routed_entries; None when nothing is routed, topk == 1); has_docs (unknown:
    True) whether the blocks restart at documents. The routed and tile steps run per head piece
    (heads.py), each piece's partials freed before the next."""
    B, tq, hq, d = q.shape
    o = alloc.empty(q.shape, q.dtype, q.device)
    lse = alloc.empty((B, hq, tq), torch.float32, q.device)
    nb = table[2].numel()
    for p in pieces_of(q, k, sel.shape[-1], index is not None):
        _fwd_piece(p.q(q), p.kv(k), p.kv(v), p.heads(sel), table, scale, q_offset,
                   p.index(index, hq, nb), block_size, has_docs, p.q(o), p.heads(lse))
    return o, lse


def _fwd_piece(q, k, v, sel, table, scale, q_offset, index, block_size, has_docs, o, lse):
    """fwd_triton on one head piece: q, k, v, o views, sel, lse and the index its slices."""
    B, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    kblk, _, blk_start, _ = table
    nsel = sel.shape[-1]
    routed = index is not None
    if routed:
        op, lp = routed_fwd(q, k, v, index, table, scale * LOG2E_F, nsel, block_size, has_docs)
        if _tile_gluon(q, k, block_size, q_offset, has_docs):
            from attn.moba.tile_gluon import tile_fwd_gluon
            tile_fwd_gluon(q, k, v, sel, op, lp, scale * LOG2E_F, q_offset, block_size,
                           out=(o, lse))
            return
    else:
        op, lp = lse, lse  # dummies, never read
    bm, bn, w, s = _cfg("fwd", q.dtype, d)
    _tile_kernel[(triton.cdiv(tq, bm), B * hq)](
        q, k, v, o, lse, q, lse, q, sel, op, lp, kblk, blk_start, scale, scale * LOG2E_F,
        q_offset, tq, tk, HQ=hq, HKV=hkv, HEAD_DIM=d, STRIDE_QT=token_stride(q, o),
        STRIDE_KT=token_stride(k, v), BLOCK_M=bm, BLOCK_N=bn, NSEL=nsel, ROUTED=routed,
        DQ_MODE=False, DOT_PREC=dot_precision(q.dtype), num_warps=w, num_stages=s)


def dq_triton(do, q, k, v, lse, delta, sel, table, scale, q_offset, index=None,
              block_size=None, has_docs=True):
    """dq [B, Tq, Hq, D]: the routed dQ partials and the tile dQ per head piece (heads.py)."""
    B, tq, hq, d = q.shape
    dq = alloc.empty(q.shape, q.dtype, q.device)
    nb = table[2].numel()
    for p in pieces_of(q, k, sel.shape[-1], index is not None):
        _dq_piece(p.q(do), p.q(q), p.kv(k), p.kv(v), p.heads(lse), p.heads(delta),
                  p.heads(sel), table, scale, q_offset, p.index(index, hq, nb), block_size,
                  has_docs, p.q(dq))
    return dq


def _dq_piece(do, q, k, v, lse, delta, sel, table, scale, q_offset, index, block_size, has_docs,
              dq):
    """dq_triton on one head piece (as _fwd_piece)."""
    B, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    kblk, _, blk_start, _ = table
    nsel = sel.shape[-1]
    routed = index is not None
    dqp = routed_dq(do, q, k, v, lse, delta, index, table, scale * LOG2E_F, nsel,
                    block_size, has_docs) if routed \
        else lse  # dummy, never read
    if routed and _tile_dq_gluon(q, k, block_size, q_offset, has_docs):
        from attn.moba.tile_dq_gluon import tile_dq_gluon
        tile_dq_gluon(do, q, k, v, lse, delta, sel, dqp, scale, scale * LOG2E_F, q_offset,
                      block_size, out=dq)
        return
    bm, bn, w, s = _cfg("dq", q.dtype, d)
    _tile_kernel[(triton.cdiv(tq, bm), B * hq)](
        q, k, v, q, lse, do, delta, dq, sel, dqp, lse, kblk, blk_start, scale, scale * LOG2E_F,
        q_offset, tq, tk, HQ=hq, HKV=hkv, HEAD_DIM=d, STRIDE_QT=token_stride(q, do, dq),
        STRIDE_KT=token_stride(k, v), BLOCK_M=bm, BLOCK_N=bn, NSEL=nsel, ROUTED=routed,
        DQ_MODE=True, DOT_PREC=dot_precision(q.dtype), num_warps=w, num_stages=s)
