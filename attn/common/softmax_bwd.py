"""Softmax-attention backward shared by flash, MoBA and NSA's compressed branch: the per-tile
math (one definition of P, dP, dS and the dK, dV, dQ products) with the mask as a constexpr hook,
and the loops over contiguous tiles that flash and NSA's compressed branch have in common.

With P = exp2(s2 − lse2) recomputed from the saved lse (s2 = q·k·scale·log2 e, log2 domain):
dV = Pᵀ dO, dP = dO Vᵀ, dS = P ⊙ (dP − delta), dK = scale · dSᵀ Q, dQ = scale · dS K; the callers
apply the scale once, at the store. Triton inlines every function here into its caller's
kernel, and each family's kernel keeps the PTX it had before the sharing (up to register
numbering; docs/flash_notes.md). Statement order matters to the pipeliner and ptxas (registers,
spills): where the families' orders differed, a constexpr knob keeps each one's (MASK_FIRST,
LSE_PAD, JUST_IN_TIME; none changes a result).

Masking (MASK, tl.constexpr): which (query, key) pairs of a tile count; the others get P = 0.
  MASK_NONE    every pair of the tile counts: no mask instructions, no load masks.
  MASK_CAUSAL  flash's rule: query position p sees key s iff row_lo(p) <= s <= p (row_lo:
               document start, window; attn/common/softmax.py), rows and keys inside the tensors.
  MASK_BOUNDS  bounds the family computed once per program. dK/dV: key s is seen by the query
               positions [key_lo[s], key_hi[s]] (MoBA: its own block's later rows, or the whole
               of a routed block; NSA: compressed row s from its block's last key,
               s·stride + block − 1, to its document's end). dQ: query row r sees the keys
               [lo[r], hi[r]) (NSA: its compressed rows).
Which tiles a program visits (causal / document / window skipping, MoBA's routed rows, NSA's
row splits) stays with the family: it decides the ranges, these functions walk them.

Memory plan of the shared loops (one program = a resident tile, the other operand streamed):
  dK/dV (dkdv_heads): registers K, V [BLOCK_N, D] and fp32 dK, dV [BLOCK_N, D]; for each query
      head of the GQA group streams Q, dO [BLOCK_M, D] (TMA descriptors or pointers) and lse,
      delta [BLOCK_M] over its row ranges; the caller stores dK, dV once.
  dQ (dq_ranges): registers Q, dO [BLOCK_M, D], lse, delta [BLOCK_M], fp32 dQ [BLOCK_M, D]
      (EXACT_DELTA: also fp32 P·K [BLOCK_M, D] and rowsum(P ⊙ dP) [BLOCK_M]); streams K, V
      [BLOCK_N, D]; the caller stores dQ once.
No loads or stores beyond those; no atomics.
"""
from __future__ import annotations

import triton
import triton.language as tl

from attn.common.jit import LOG2E, cvt, mma
from attn.common.softmax import row_lo

MASK_NONE = tl.constexpr(0)
MASK_CAUSAL = tl.constexpr(1)
MASK_BOUNDS = tl.constexpr(2)


@triton.jit
def _visible_t(rows, r_ok, q_offset, key_lo, key_hi, SEG_START, window, MASK: tl.constexpr,
               HAS_SEG: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """[BLOCK_N, BLOCK_M] mask of dkdv_probs: key s (row of the tile) pairs with query row r."""
    qpos = q_offset + rows
    if MASK == MASK_CAUSAL:
        lo = row_lo(qpos, r_ok, SEG_START, window, HAS_SEG, HAS_WINDOW)
        ok = (key_lo[:, None] <= qpos[None, :]) & (key_lo[:, None] >= lo[None, :]) \
            & r_ok[None, :]
    else:
        ok = (qpos[None, :] >= key_lo[:, None]) & (qpos[None, :] <= key_hi[:, None]) \
            & r_ok[None, :]
    return ok


@triton.jit
def dkdv_probs(k, q, lse2, rows, r_ok, q_offset, key_lo, key_hi, SEG_START, window, qk_scale,
               MASK: tl.constexpr, HAS_SEG: tl.constexpr, HAS_WINDOW: tl.constexpr,
               DOT_PREC: tl.constexpr, MASK_FIRST: tl.constexpr = False):
    """Pᵀ [BLOCK_N, BLOCK_M] of key tile k and query tile q (transposed scores: Pᵀ comes out
    ready for dV = Pᵀ dO); the rows sit at positions q_offset + rows, r_ok their validity.
    MASK_CAUSAL: key_lo holds the key positions (key_hi unused); MASK_BOUNDS: the per-key
    query bounds. MASK_FIRST: the mask is formed before the exponentials, not after (same
    result; the order the family's kernel was tuned with, see dkdv_rows)."""
    s_t = mma(k, tl.trans(q), None, DOT_PREC) * qk_scale
    if MASK_FIRST:
        ok = _visible_t(rows, r_ok, q_offset, key_lo, key_hi, SEG_START, window, MASK, HAS_SEG,
                        HAS_WINDOW)
    p_t = tl.math.exp2(s_t - lse2[None, :])
    if MASK != MASK_NONE:
        if not MASK_FIRST:
            ok = _visible_t(rows, r_ok, q_offset, key_lo, key_hi, SEG_START, window, MASK,
                            HAS_SEG, HAS_WINDOW)
        p_t = tl.where(ok, p_t, 0.0)
    return p_t


@triton.jit
def dkdv_acc(dk, dv, p_t, q, do, v, delta, DOT_PREC: tl.constexpr):
    """dV += Pᵀ dO and dK += dSᵀ Q (unscaled) for one tile pair, from Pᵀ (dkdv_probs)."""
    dv = mma(cvt(p_t, do.dtype), do, dv, DOT_PREC)
    dp_t = mma(v, tl.trans(do), None, DOT_PREC)
    ds_t = p_t * (dp_t - delta[None, :])
    dk = mma(cvt(ds_t, q.dtype), q, dk, DOT_PREC)
    return dk, dv


@triton.jit
def dq_probs(q, k, lse2, kpos, qpos, lo, hi, Tk, qk_scale, MASK: tl.constexpr,
             DOT_PREC: tl.constexpr):
    """P [BLOCK_M, BLOCK_N] of query tile q and key tile k at key positions kpos.
    MASK_CAUSAL: lo = row_lo of each row, qpos their positions (hi unused); MASK_BOUNDS: the
    rows' key bounds [lo, hi) (qpos, Tk unused)."""
    s = mma(q, tl.trans(k), None, DOT_PREC) * qk_scale
    p = tl.math.exp2(s - lse2[:, None])
    if MASK == MASK_CAUSAL:
        ok = (kpos[None, :] <= qpos[:, None]) & (kpos[None, :] >= lo[:, None]) \
            & (kpos < Tk)[None, :]
        p = tl.where(ok, p, 0.0)
    elif MASK == MASK_BOUNDS:
        ok = (kpos[None, :] >= lo[:, None]) & (kpos[None, :] < hi[:, None])
        p = tl.where(ok, p, 0.0)
    return p


@triton.jit
def dq_acc(dq, p, k, v, do, delta, DOT_PREC: tl.constexpr):
    """dQ += dS K (unscaled) for one tile pair, from P; also returns dP (NSA's exact delta)."""
    dp = mma(do, tl.trans(v), None, DOT_PREC)
    ds = p * (dp - delta[:, None])
    dq = mma(cvt(ds, k.dtype), k, dq, DOT_PREC)
    return dq, dp


@triton.jit
def _load(ptrs, ok, MASKED: tl.constexpr, OTHER: tl.constexpr = 0.0):
    """tl.load, with the mask only in masked ranges (unmasked tiles lie inside the tensors)."""
    if MASKED:
        x = tl.load(ptrs, mask=ok, other=OTHER)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def dkdv_rows(dk, dv, k, v, q_base, do_base, qd, dod, row0, col, lse_ptr, delta_ptr, start, end,
              key_lo, key_hi, SEG_START, window, q_offset, Tq, qk_scale,
              STRIDE_QT: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
              MASK: tl.constexpr, HAS_SEG: tl.constexpr, HAS_WINDOW: tl.constexpr,
              LSE_PAD: tl.constexpr, JUST_IN_TIME: tl.constexpr, DOT_PREC: tl.constexpr,
              TMA: tl.constexpr):
    """Query rows [start, end) of one head, BLOCK_M at a time, into dK, dV of the key tile; Q,
    dO tiles through the descriptors qd, dod at (row0 + row, col) when TMA. Two statement
    orders, each the one a family's kernel was tuned with (either changes the other's SASS):
    JUST_IN_TIME: every value formed right before its first use (row bound, Q's address, Q,
    lse, P, dO's address, dO, delta); else both addresses first, the row bound after Q's load,
    delta before dO. LSE_PAD: the lse of rows past Tq (masked out of P: no result uses it)."""
    MASKED: tl.constexpr = MASK != MASK_NONE
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    tile = offs_m[:, None] * STRIDE_QT + offs_d[None, :]  # int32 offsets inside one row chunk
    for start_m in range(start, end, BLOCK_M):
        rows = start_m + offs_m
        row = tl.cast(start_m, tl.int64) * STRIDE_QT  # int64: Tq·Hq·D may pass 2^31
        if JUST_IN_TIME:
            r_ok = rows < Tq
        else:
            q_ptrs = q_base + row + tile
            do_ptrs = do_base + row + tile
        if TMA:
            q = qd.load([row0 + start_m, col])
        elif JUST_IN_TIME:
            q = _load(q_base + row + tile, r_ok[:, None], MASKED)
        else:
            q = _load(q_ptrs, (rows < Tq)[:, None], MASKED)
        if not JUST_IN_TIME:
            r_ok = rows < Tq
        lse2 = _load(lse_ptr + rows, r_ok, MASKED, LSE_PAD) * LOG2E
        p_t = dkdv_probs(k, q, lse2, rows, r_ok, q_offset, key_lo, key_hi, SEG_START, window,
                         qk_scale, MASK, HAS_SEG, HAS_WINDOW, DOT_PREC)
        if JUST_IN_TIME:
            if TMA:
                do = dod.load([row0 + start_m, col])
            else:
                do = _load(do_base + row + tile, r_ok[:, None], MASKED)
            delta = _load(delta_ptr + rows, r_ok, MASKED)
        else:
            delta = _load(delta_ptr + rows, r_ok, MASKED)
            if TMA:
                do = dod.load([row0 + start_m, col])
            else:
                do = _load(do_ptrs, (rows < Tq)[:, None], MASKED)
        dk, dv = dkdv_acc(dk, dv, p_t, q, do, v, delta, DOT_PREC)
    return dk, dv


@triton.jit
def dkdv_heads(k, v, Q, DO, LSE, DELTA, b, hkv, m_lo, f_lo, f_hi, m_hi, key_lo, key_hi,
               SEG_START, window, q_offset, Tq, qk_scale,
               HQ: tl.constexpr, HKV: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
               HAS_SEG: tl.constexpr, HAS_WINDOW: tl.constexpr, LSE_PAD: tl.constexpr,
               JUST_IN_TIME: tl.constexpr, DOT_PREC: tl.constexpr, TMA: tl.constexpr):
    """fp32 (dK unscaled, dV) of the key tile k, v of (batch b, KV head hkv) from every query
    head of its GQA group: rows [m_lo, f_lo) and [f_hi, m_hi) masked by MASK, [f_lo, f_hi)
    unmasked (every pair visible)."""
    GROUP: tl.constexpr = HQ // HKV
    STRIDE_QT: tl.constexpr = HQ * HEAD_DIM
    if TMA:
        # rows [0, (b+1)·Tq) of the [B·Tq, Hq·D] view: the tile loads of batch b stop at its end
        qd = tl.make_tensor_descriptor(Q, shape=[(b + 1) * Tq, HQ * HEAD_DIM],
                                       strides=[STRIDE_QT, 1], block_shape=[BLOCK_M, HEAD_DIM])
        dod = tl.make_tensor_descriptor(DO, shape=[(b + 1) * Tq, HQ * HEAD_DIM],
                                        strides=[STRIDE_QT, 1], block_shape=[BLOCK_M, HEAD_DIM])
    else:
        qd = Q  # unused
        dod = DO
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    for g in range(GROUP):
        h = hkv * GROUP + g
        q_base = Q + b.to(tl.int64) * Tq * STRIDE_QT + h * HEAD_DIM
        do_base = DO + b.to(tl.int64) * Tq * STRIDE_QT + h * HEAD_DIM
        row_base = (b * HQ + h).to(tl.int64) * Tq
        dk, dv = dkdv_rows(dk, dv, k, v, q_base, do_base, qd, dod, b * Tq, h * HEAD_DIM,
                           LSE + row_base, DELTA + row_base, m_lo, f_lo, key_lo, key_hi,
                           SEG_START, window, q_offset, Tq, qk_scale, STRIDE_QT, BLOCK_M,
                           HEAD_DIM, MASK, HAS_SEG, HAS_WINDOW, LSE_PAD, JUST_IN_TIME, DOT_PREC,
                           TMA)
        dk, dv = dkdv_rows(dk, dv, k, v, q_base, do_base, qd, dod, b * Tq, h * HEAD_DIM,
                           LSE + row_base, DELTA + row_base, f_lo, f_hi, key_lo, key_hi,
                           SEG_START, window, q_offset, Tq, qk_scale, STRIDE_QT, BLOCK_M,
                           HEAD_DIM, MASK_NONE, HAS_SEG, HAS_WINDOW, LSE_PAD, JUST_IN_TIME,
                           DOT_PREC, TMA)
        dk, dv = dkdv_rows(dk, dv, k, v, q_base, do_base, qd, dod, b * Tq, h * HEAD_DIM,
                           LSE + row_base, DELTA + row_base, f_hi, m_hi, key_lo, key_hi,
                           SEG_START, window, q_offset, Tq, qk_scale, STRIDE_QT, BLOCK_M,
                           HEAD_DIM, MASK, HAS_SEG, HAS_WINDOW, LSE_PAD, JUST_IN_TIME, DOT_PREC,
                           TMA)
    return dk, dv


@triton.jit
def dq_keys(dq, pk, dsum, q, do, lse2, delta, k_base, v_base, kd, vd, row0, col, start, end,
            qpos, lo, hi, Tk, qk_scale, STRIDE_KT: tl.constexpr, BLOCK_N: tl.constexpr,
            HEAD_DIM: tl.constexpr, MASK: tl.constexpr, EXACT_DELTA: tl.constexpr,
            DOT_PREC: tl.constexpr, TMA: tl.constexpr):
    """Keys [start, end), BLOCK_N at a time, into dQ of the query tile; EXACT_DELTA: also
    pk += P K and dsum += rowsum(P ⊙ dP) (else pk, dsum pass through untouched).
    TMA: K, V tiles through the descriptors kd, vd at (row0 + key, col); keys past this
    batch's Tk come back zero and are masked out of P."""
    MASKED: tl.constexpr = MASK != MASK_NONE
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    tile = offs_n[:, None] * STRIDE_KT + offs_d[None, :]  # int32 offsets inside one key chunk
    for start_n in range(start, end, BLOCK_N):
        kpos = start_n + offs_n
        row = tl.cast(start_n, tl.int64) * STRIDE_KT  # int64: Tk·Hkv·D may pass 2^31
        k_ptrs = k_base + row + tile
        v_ptrs = v_base + row + tile
        if TMA:
            k = kd.load([row0 + start_n, col])
            v = vd.load([row0 + start_n, col])
        else:
            k = _load(k_ptrs, (kpos < Tk)[:, None], MASKED)
            v = _load(v_ptrs, (kpos < Tk)[:, None], MASKED)
        p = dq_probs(q, k, lse2, kpos, qpos, lo, hi, Tk, qk_scale, MASK, DOT_PREC)
        dq, dp = dq_acc(dq, p, k, v, do, delta, DOT_PREC)
        if EXACT_DELTA:
            pk = mma(cvt(p, k.dtype), k, pk, DOT_PREC)
            dsum += tl.sum(p * dp, 1)
    return dq, pk, dsum


@triton.jit
def dq_ranges(q, do, lse2, delta, K, V, k_base, v_base, b, hkv, kv_lo, f_lo, f_hi, kv_hi, qpos,
              lo, hi, Tk, qk_scale, HKV: tl.constexpr, HEAD_DIM: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
              EXACT_DELTA: tl.constexpr, DOT_PREC: tl.constexpr, TMA: tl.constexpr):
    """fp32 (dQ unscaled, P·K, rowsum(P ⊙ dP)) of a resident query tile of batch b against the
    keys of its KV head hkv (at k_base, v_base): keys [kv_lo, f_lo) and [f_hi, kv_hi) masked by
    MASK, [f_lo, f_hi) unmasked. Without EXACT_DELTA the last two are zeros the compiler
    drops."""
    STRIDE_KT: tl.constexpr = HKV * HEAD_DIM
    if TMA:
        # rows [0, (b+1)·Tk) of the [B·Tk, Hkv·D] view: the tile loads of batch b stop at its end
        kd = tl.make_tensor_descriptor(K, shape=[(b + 1) * Tk, HKV * HEAD_DIM],
                                       strides=[STRIDE_KT, 1], block_shape=[BLOCK_N, HEAD_DIM])
        vd = tl.make_tensor_descriptor(V, shape=[(b + 1) * Tk, HKV * HEAD_DIM],
                                       strides=[STRIDE_KT, 1], block_shape=[BLOCK_N, HEAD_DIM])
    else:
        kd = K  # unused
        vd = V
    row0 = b * Tk
    col = hkv * HEAD_DIM
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    pk = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    dsum = tl.zeros([BLOCK_M], dtype=tl.float32)
    dq, pk, dsum = dq_keys(dq, pk, dsum, q, do, lse2, delta, k_base, v_base, kd, vd, row0, col,
                           kv_lo, f_lo, qpos, lo, hi, Tk, qk_scale, STRIDE_KT, BLOCK_N, HEAD_DIM,
                           MASK, EXACT_DELTA, DOT_PREC, TMA)
    dq, pk, dsum = dq_keys(dq, pk, dsum, q, do, lse2, delta, k_base, v_base, kd, vd, row0, col,
                           f_lo, f_hi, qpos, lo, hi, Tk, qk_scale, STRIDE_KT, BLOCK_N, HEAD_DIM,
                           MASK_NONE, EXACT_DELTA, DOT_PREC, TMA)
    dq, pk, dsum = dq_keys(dq, pk, dsum, q, do, lse2, delta, k_base, v_base, kd, vd, row0, col,
                           f_hi, kv_hi, qpos, lo, hi, Tk, qk_scale, STRIDE_KT, BLOCK_N, HEAD_DIM,
                           MASK, EXACT_DELTA, DOT_PREC, TMA)
    return dq, pk, dsum
