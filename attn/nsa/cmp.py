"""NSA compressed branch in Triton: softmax attention over the compressed keys, forward (o, lse)
and a deterministic backward (dq, dk_cmp, dv_cmp). The definition is attn/nsa/ref.py's
`cmp_attn_ref` (compressed layout, documents and q_offset: see ref.py's module docstring).

    cmp_attn_fwd(q, k_cmp, v_cmp, *, scale, cmp_block, cmp_stride, cu_seqlens, q_offset, tk)
        -> (o [B, Tq, Hq, D] q.dtype, lse [B, Hq, Tq] fp32, natural log, +inf for empty rows)
    cmp_attn_bwd(do, q, k_cmp, v_cmp, o, lse, *, same keywords) -> (dq, dk_cmp, dv_cmp)
    cmp_attn(q, k_cmp, v_cmp, *, scale, cmp_block, cmp_stride, cu_seqlens, q_offset, tk)
        -> (o, lse), differentiable w.r.t. q, k_cmp, v_cmp (lse is not differentiable)

Masking. Query row i (absolute position p = q_offset + i) sees the compressed rows
[c_lo(p), c_hi(p)): c_lo is the first compressed row of p's document (0 without documents),
c_hi = c_lo + #{r >= 0 : r*stride + cmp_block - 1 <= p_rel} (p_rel: position in the document),
capped at the document's rows; c_hi == c_lo: the row sees nothing (o = 0, lse = +inf). Both
bounds are non-decreasing in p, so, as in attn/flash, a query tile sees [c_lo(first), c_hi(last))
and each of its rows sees [c_lo(last), c_hi(first)): key tiles inside the latter run unmasked,
those around it masked, all others are never loaded. Dually compressed row c is seen by the
positions [pf(c), pl(c)] (its block's last key .. its document's last position), both
non-decreasing, which bounds the query tiles of the dK/dV kernel. Without documents the bounds
are computed in the kernels; with cu_seqlens they come as int32 arrays built by torch ops on the
device (one host sync: the row-count check).

Memory plan (exp2 domain: s2 = q.k * scale * log2(e); fp32 accumulators everywhere)
  forward    : one program = BLOCK_M query rows of one (batch, query head). Registers: Q tile
               [BLOCK_M, D], accumulator [BLOCK_M, D], running max/sum [BLOCK_M], one score tile
               [BLOCK_M, BLOCK_N]. Streams K_cmp, V_cmp tiles [BLOCK_N, D] of the query head's KV
               head (GQA: shared rows, never a repeated copy). Writes O, lse once.
  preprocess : delta = rowsum(O * dO) fp32 [B, Hq, Tq] (attn/flash/bwd.py's kernel).
  dQ         : one program = BLOCK_M query rows of one (batch, query head), like the forward;
               writes dQ once and replaces its rows of delta by the exact delta (below).
  dK/dV      : one program = BLOCK_N compressed rows of one (batch, KV head) and one split of
               the query rows (_dkdv_chunk). Registers: K, V tiles and fp32 dK, dV [BLOCK_N, D];
               loops over the G query heads of the group and the query tiles of its split that
               see the key tile, streaming Q, dO [BLOCK_M, D], lse, delta. Writes dK, dV once
               (several splits: fp32 partials, summed in a fixed order). No atomics anywhere:
               deterministic.
With P = exp2(s2 - lse2) from the saved lse (lse = +inf gives P = 0): dV = P^T dO,
dS = P * (dO V^T - delta), dK = scale * dS^T Q, dQ = scale * dS K.
Exact delta: rowsum(O * dO) uses O rounded to bf16/fp16; its error times sum_j P_j K_j doubles
dQ's error on rows that see few compressed rows (every document's first positions). So the dQ
kernel also accumulates PK = P K (one more block product) and delta* = rowsum(P * dP) in fp32,
returns dQ = dS K - (delta* - delta) PK (a small correction) and hands delta* to dK/dV.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from attn.dispatch import check_triton_inputs
from attn.flash import common
from attn.flash.bwd import _bwd_preprocess
from attn.flash.common import LN2, LOG2E, LOG2E_F, cvt, mma
from attn.masks import check_cu_seqlens
from attn.nsa.ref import cmp_cu_seqlens, num_cmp_blocks

_HEAD_DIMS = (16, 32, 64, 128)
_BIG = tl.constexpr(2 ** 30)  # past every position and every compressed row (int32 sentinel)


@triton.jit
def _q_tile(pid_m, pid_bh, q_offset, CLO, CHI, cmp_block, cmp_stride, Tq, Tc,
            HQ: tl.constexpr, HKV: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_N: tl.constexpr, HAS_DOCS: tl.constexpr):
    """Shared by the forward and dQ programs (one query tile of one (batch, query head)): row
    offsets, the KV head's bases, per-row bounds [lo, hi) and the key ranges [kv_lo, f_lo)
    masked, [f_lo, f_hi) unmasked, [f_hi, kv_hi) masked (bounds monotone in the row, so
    min/max are the first/last valid row's)."""
    b = pid_bh // HQ
    h = pid_bh % HQ
    kv_base = b.to(tl.int64) * Tc * (HKV * HEAD_DIM) + (h // (HQ // HKV)) * HEAD_DIM
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = rows < Tq
    q_off = b.to(tl.int64) * Tq * (HQ * HEAD_DIM) + h * HEAD_DIM \
        + rows[:, None] * (HQ * HEAD_DIM) + tl.arange(0, HEAD_DIM)[None, :]
    if HAS_DOCS:
        lo = tl.load(CLO + rows, mask=r_ok, other=0)
        hi = tl.load(CHI + rows, mask=r_ok, other=0)
    else:
        x = q_offset + rows - cmp_block + 1  # position minus the first block's last key
        hi = tl.where(x >= 0, tl.maximum(x, 0) // cmp_stride + 1, 0)
        hi = tl.where(r_ok, tl.minimum(hi, Tc), 0)  # padding rows: empty
        lo = hi * 0
    lo_last = tl.max(tl.where(r_ok, lo, 0), 0)
    hi_first = tl.min(tl.where(r_ok, hi, _BIG), 0)
    kv_lo = (tl.min(tl.where(r_ok, lo, _BIG), 0) // BLOCK_N) * BLOCK_N
    kv_hi = tl.max(tl.where(r_ok, hi, 0), 0)
    f_lo = tl.maximum(tl.cdiv(lo_last, BLOCK_N) * BLOCK_N, kv_lo)
    f_hi = (hi_first // BLOCK_N) * BLOCK_N
    if f_hi <= f_lo:  # no key tile is seen by every row: one masked range
        f_lo = kv_lo
        f_hi = kv_lo
    return rows, r_ok, q_off, kv_base, lo, hi, kv_lo, f_lo, f_hi, kv_hi


@triton.jit
def _ld(ptrs, ok, MASKED: tl.constexpr, OTHER: tl.constexpr = 0.0):
    """tl.load, with the mask only in masked tiles (unmasked tiles lie inside the tensors)."""
    if MASKED:
        x = tl.load(ptrs, mask=ok, other=OTHER)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, start, end, lo, hi, Tc, qk_scale,
               STRIDE_KT: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
               MASKED: tl.constexpr, DOT_PREC: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(start, end, BLOCK_N):
        c = start_n + offs_n
        kv_ptrs = c[:, None] * STRIDE_KT + offs_d[None, :]
        k = _ld(k_base + kv_ptrs, (c < Tc)[:, None], MASKED)
        s = mma(q, tl.trans(k), None, DOT_PREC) * qk_scale
        if MASKED:
            ok = (c[None, :] >= lo[:, None]) & (c[None, :] < hi[:, None])
            s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = _ld(v_base + kv_ptrs, (c < Tc)[:, None], MASKED)
        acc = mma(cvt(p, v.dtype), v, acc, DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, CLO, CHI, qk_scale, q_offset, cmp_block, cmp_stride, Tq, Tc,
                HQ: tl.constexpr, HKV: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_DOCS: tl.constexpr,
                DOT_PREC: tl.constexpr):
    # latest query tiles see the most compressed rows: run them first
    pid_bh = tl.program_id(1)
    rows, r_ok, q_off, kv_base, lo, hi, kv_lo, f_lo, f_hi, kv_hi = _q_tile(
        tl.num_programs(0) - 1 - tl.program_id(0), pid_bh, q_offset, CLO, CHI, cmp_block,
        cmp_stride, Tq, Tc, HQ, HKV, HEAD_DIM, BLOCK_M, BLOCK_N, HAS_DOCS)
    STRIDE_KT: tl.constexpr = HKV * HEAD_DIM
    k_base = K + kv_base
    v_base = V + kv_base
    q = tl.load(Q + q_off, mask=r_ok[:, None], other=0.0)

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30  # finite: a fully masked tile gives p=0
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, kv_lo, f_lo, lo, hi, Tc,
                               qk_scale, STRIDE_KT, BLOCK_N, HEAD_DIM, True, DOT_PREC)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, f_lo, f_hi, lo, hi, Tc,
                               qk_scale, STRIDE_KT, BLOCK_N, HEAD_DIM, False, DOT_PREC)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, f_hi, kv_hi, lo, hi, Tc,
                               qk_scale, STRIDE_KT, BLOCK_N, HEAD_DIM, True, DOT_PREC)

    seen = l_i > 0.0  # rows with no visible compressed row keep acc = 0, l = 0
    l_safe = tl.where(seen, l_i, 1.0)
    tl.store(O + q_off, cvt(acc / l_safe[:, None], O.dtype.element_ty), mask=r_ok[:, None])
    lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * LN2, float("inf"))
    tl.store(LSE + pid_bh.to(tl.int64) * Tq + rows, lse, mask=r_ok)


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_ptr, delta_ptr, start, end, pf, pl,
                q_offset, Tq, qk_scale, STRIDE_QT: tl.constexpr, BLOCK_M: tl.constexpr,
                HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, DOT_PREC: tl.constexpr):
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    for start_m in range(start, end, BLOCK_M):
        rows = start_m + offs_m
        q_ptrs = rows[:, None] * STRIDE_QT + offs_d[None, :]
        r_ok = rows < Tq
        q = _ld(q_base + q_ptrs, r_ok[:, None], MASKED)
        lse2 = _ld(lse_ptr + rows, r_ok, MASKED, float("inf")) * LOG2E
        # transposed scores [BLOCK_N, BLOCK_M]: P^T comes out ready for dV = P^T dO
        s_t = mma(k, tl.trans(q), None, DOT_PREC) * qk_scale
        p_t = tl.math.exp2(s_t - lse2[None, :])
        if MASKED:
            qpos = q_offset + rows
            ok = (qpos[None, :] >= pf[:, None]) & (qpos[None, :] <= pl[:, None]) & r_ok[None, :]
            p_t = tl.where(ok, p_t, 0.0)
        do = _ld(do_base + q_ptrs, r_ok[:, None], MASKED)
        delta = _ld(delta_ptr + rows, r_ok, MASKED)
        dv = mma(cvt(p_t, do.dtype), do, dv, DOT_PREC)
        dp_t = mma(v, tl.trans(do), None, DOT_PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = mma(cvt(ds_t, q.dtype), q, dk, DOT_PREC)
    return dk, dv


@triton.jit
def _dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, PF, PL, scale, qk_scale, q_offset, cmp_block,
                 cmp_stride, Tq, Tc, chunk,
                 HQ: tl.constexpr, HKV: tl.constexpr, HEAD_DIM: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_DOCS: tl.constexpr,
                 DOT_PREC: tl.constexpr):
    # compressed tile 0 is seen by the most queries: program 0 is the heaviest, it runs first.
    # Axis 2 splits the query rows (see _dkdv_chunk).
    start_n = tl.program_id(0) * BLOCK_N
    pid_bh = tl.program_id(1)
    b = pid_bh // HKV
    hkv = pid_bh % HKV
    GROUP: tl.constexpr = HQ // HKV
    STRIDE_QT: tl.constexpr = HQ * HEAD_DIM
    STRIDE_KT: tl.constexpr = HKV * HEAD_DIM
    c = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    c_ok = c < Tc
    kv_off = b.to(tl.int64) * Tc * STRIDE_KT + hkv * HEAD_DIM \
        + c[:, None] * STRIDE_KT + offs_d[None, :]
    k = tl.load(K + kv_off, mask=c_ok[:, None], other=0.0)
    v = tl.load(V + kv_off, mask=c_ok[:, None], other=0.0)
    # positions [pf, pl] that see each compressed row; padding rows: the empty [BIG, -1]
    if HAS_DOCS:
        pf = tl.load(PF + c, mask=c_ok, other=_BIG)
        pl = tl.load(PL + c, mask=c_ok, other=-1)
    else:
        pf = tl.where(c_ok, c * cmp_stride + cmp_block - 1, _BIG)
        pl = tl.where(c_ok, _BIG, -1)

    # query rows (row = position - q_offset) inside this program's split [r0, r1) (chunk: a
    # multiple of BLOCK_M): [m_lo, f_lo) masked, [f_lo, f_hi) unmasked (every row sees every
    # key of the tile), [f_hi, m_hi) masked
    r0 = tl.program_id(2) * chunk
    r1 = tl.minimum(r0 + chunk, Tq)
    m_lo = tl.maximum((tl.maximum(tl.min(pf, 0) - q_offset, 0) // BLOCK_M) * BLOCK_M, r0)
    m_hi = tl.minimum(tl.max(pl, 0) - q_offset + 1, r1)
    pf_last = tl.max(tl.where(c_ok, pf, 0), 0)
    f_lo = tl.maximum(tl.cdiv(tl.maximum(pf_last - q_offset, 0), BLOCK_M) * BLOCK_M, m_lo)
    pl_first = tl.min(tl.where(c_ok, pl, _BIG), 0)
    f_hi = (tl.maximum(tl.minimum(pl_first - q_offset + 1, r1), 0) // BLOCK_M) * BLOCK_M
    if f_hi <= f_lo:
        f_lo = m_lo
        f_hi = m_lo

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    for g in range(GROUP):
        h = hkv * GROUP + g
        q_base = Q + b.to(tl.int64) * Tq * STRIDE_QT + h * HEAD_DIM
        do_base = DO + b.to(tl.int64) * Tq * STRIDE_QT + h * HEAD_DIM
        row_base = (b * HQ + h).to(tl.int64) * Tq
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, LSE + row_base, DELTA + row_base,
                             m_lo, f_lo, pf, pl, q_offset, Tq, qk_scale, STRIDE_QT, BLOCK_M,
                             HEAD_DIM, True, DOT_PREC)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, LSE + row_base, DELTA + row_base,
                             f_lo, f_hi, pf, pl, q_offset, Tq, qk_scale, STRIDE_QT, BLOCK_M,
                             HEAD_DIM, False, DOT_PREC)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, LSE + row_base, DELTA + row_base,
                             f_hi, m_hi, pf, pl, q_offset, Tq, qk_scale, STRIDE_QT, BLOCK_M,
                             HEAD_DIM, True, DOT_PREC)
    # one split: dK, dV in the KV dtype; several: fp32 partials [splits, B, Tc, Hkv, D]
    out = kv_off + tl.program_id(2).to(tl.int64) * tl.num_programs(1) * Tc * HEAD_DIM
    tl.store(DK + out, cvt(dk * scale, DK.dtype.element_ty), mask=c_ok[:, None])
    tl.store(DV + out, cvt(dv, DV.dtype.element_ty), mask=c_ok[:, None])


@triton.jit
def _dq_inner(dq, pk, dsum, q, do, lse2, delta, k_base, v_base, start, end, lo, hi, Tc, qk_scale,
              STRIDE_KT: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
              MASKED: tl.constexpr, DOT_PREC: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(start, end, BLOCK_N):
        c = start_n + offs_n
        kv_ptrs = c[:, None] * STRIDE_KT + offs_d[None, :]
        k = _ld(k_base + kv_ptrs, (c < Tc)[:, None], MASKED)
        v = _ld(v_base + kv_ptrs, (c < Tc)[:, None], MASKED)
        s = mma(q, tl.trans(k), None, DOT_PREC) * qk_scale
        p = tl.math.exp2(s - lse2[:, None])
        if MASKED:
            ok = (c[None, :] >= lo[:, None]) & (c[None, :] < hi[:, None])
            p = tl.where(ok, p, 0.0)
        dp = mma(do, tl.trans(v), None, DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq = mma(cvt(ds, k.dtype), k, dq, DOT_PREC)
        pk = mma(cvt(p, k.dtype), k, pk, DOT_PREC)
        dsum += tl.sum(p * dp, 1)
    return dq, pk, dsum


@triton.jit
def _dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, CLO, CHI, scale, qk_scale, q_offset, cmp_block,
               cmp_stride, Tq, Tc,
               HQ: tl.constexpr, HKV: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_DOCS: tl.constexpr,
               DOT_PREC: tl.constexpr):
    pid_bh = tl.program_id(1)  # heaviest (last) query tiles first
    rows, r_ok, q_off, kv_base, lo, hi, kv_lo, f_lo, f_hi, kv_hi = _q_tile(
        tl.num_programs(0) - 1 - tl.program_id(0), pid_bh, q_offset, CLO, CHI, cmp_block,
        cmp_stride, Tq, Tc, HQ, HKV, HEAD_DIM, BLOCK_M, BLOCK_N, HAS_DOCS)
    STRIDE_KT: tl.constexpr = HKV * HEAD_DIM
    k_base = K + kv_base
    v_base = V + kv_base
    q = tl.load(Q + q_off, mask=r_ok[:, None], other=0.0)
    do = tl.load(DO + q_off, mask=r_ok[:, None], other=0.0)
    # lse = +inf (empty or padding row) makes every P of the row 0
    lse2 = tl.load(LSE + pid_bh.to(tl.int64) * Tq + rows, mask=r_ok, other=float("inf")) * LOG2E
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * Tq + rows, mask=r_ok, other=0.0)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    pk = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    dsum = tl.zeros([BLOCK_M], dtype=tl.float32)
    dq, pk, dsum = _dq_inner(dq, pk, dsum, q, do, lse2, delta, k_base, v_base, kv_lo, f_lo, lo,
                             hi, Tc, qk_scale, STRIDE_KT, BLOCK_N, HEAD_DIM, True, DOT_PREC)
    dq, pk, dsum = _dq_inner(dq, pk, dsum, q, do, lse2, delta, k_base, v_base, f_lo, f_hi, lo,
                             hi, Tc, qk_scale, STRIDE_KT, BLOCK_N, HEAD_DIM, False, DOT_PREC)
    dq, pk, dsum = _dq_inner(dq, pk, dsum, q, do, lse2, delta, k_base, v_base, f_hi, kv_hi, lo,
                             hi, Tc, qk_scale, STRIDE_KT, BLOCK_N, HEAD_DIM, True, DOT_PREC)
    # delta correction (see the module docstring): dsum is the exact delta
    dq = dq - (dsum - delta)[:, None] * pk
    tl.store(DQ + q_off, cvt(dq * scale, DQ.dtype.element_ty), mask=r_ok[:, None])
    tl.store(DELTA + pid_bh.to(tl.int64) * Tq + rows, dsum, mask=r_ok)  # for the dK/dV kernel


# ---------------------------------------------------------------------------------------------
# launch

# (BLOCK_M, BLOCK_N, warps, stages) by head dim (common.pick_dim: fp32 takes the entry of 2*D).
# H100, bf16, D = 128, T = 64k (Tc = 4k), cmp 32/16, triton 3.6. Hq = 64, Hkv = 4: forward
# 9.9 ms (445 TFLOP/s; 128x128/8/3 430, 64x64/4/3 421, 128x64/4/3 313), backward 35.6 ms (dQ
# 15, dK/dV 20; dQ 128x64/8/3 best of six; dK/dV 64x128/8/2 36 ms for the whole backward,
# 64x64/4/3 38, 128x64/8/2 52, 64x64/8/2 55, 64x32/4/3 59; 8/3 beat 8/2 by 5% at Hq = 16).
# Hq = 16: Hkv = 4 2.5 / 9.5 ms, Hkv = 16 2.5 / 8.6 ms (forward / backward).
FWD_CFGS = {64: (128, 64, 4, 3), 128: (128, 64, 8, 3), 256: (64, 32, 4, 2)}
# dK/dV: BLOCK_N compressed rows resident, BLOCK_M query rows streamed
DKDV_CFGS = {64: (64, 64, 4, 3), 128: (64, 128, 8, 3), 256: (32, 64, 4, 2)}
DQ_CFGS = {64: (128, 64, 4, 3), 128: (128, 64, 8, 3), 256: (64, 32, 4, 2)}
INTERP_BLOCKS = (16, 16, 4, 1)  # interpreter: small tiles, many tile edges
# dK/dV row splits: the first compressed tiles are seen by nearly every query row, so one
# program per key tile leaves the heaviest program G * Tq rows of work. The rows are cut into
# chunks (fp32 partials, summed in a fixed order) until the grid has about DKDV_PROGRAMS
# programs, each chunk at least DKDV_MIN_ROWS rows (interpreter: INTERP_CHUNK rows, so the
# tests cover several splits).
DKDV_PROGRAMS = 2048
DKDV_MIN_ROWS = 1024
INTERP_CHUNK = 64


def _dkdv_chunk(tq, n_progs, bm):
    """Query rows per dK/dV split (a multiple of bm)."""
    if common.INTERPRET:
        return INTERP_CHUNK
    splits = max(1, min(triton.cdiv(DKDV_PROGRAMS, n_progs), tq // DKDV_MIN_ROWS))
    return triton.cdiv(triton.cdiv(tq, splits), bm) * bm


def _cfg(table, d, dtype):
    return INTERP_BLOCKS if common.INTERPRET else table[common.pick_dim(table, d, dtype)]


def _check(q, k_cmp, v_cmp, cmp_block, cmp_stride, cu_seqlens, q_offset, tk):
    """Validate the arguments (ValueError naming the rule); returns tk."""
    for name, t in (("q", q), ("k_cmp", k_cmp), ("v_cmp", v_cmp)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [B, T, H, D], got "
                             f"{getattr(t, 'shape', type(t))}")
    B, tq, hq, d = q.shape
    if k_cmp.shape != v_cmp.shape or k_cmp.shape[0] != B or k_cmp.shape[3] != d:
        raise ValueError(f"k_cmp {tuple(k_cmp.shape)} and v_cmp {tuple(v_cmp.shape)} must have "
                         f"one shape, and agree with q {tuple(q.shape)} on batch and head dim")
    if k_cmp.shape[2] == 0 or hq % k_cmp.shape[2] != 0:
        raise ValueError(f"GQA: Hq={hq} (q dim 2) must be a multiple of Hkv={k_cmp.shape[2]}")
    if not (q.dtype == k_cmp.dtype == v_cmp.dtype) or not (q.device == k_cmp.device
                                                           == v_cmp.device):
        raise ValueError(f"q, k_cmp, v_cmp must share one dtype and device, got {q.dtype}, "
                         f"{k_cmp.dtype}, {v_cmp.dtype} on {q.device}, {k_cmp.device}, "
                         f"{v_cmp.device}")
    if not q.is_cuda and not common.INTERPRET:
        raise ValueError(f"the NSA compressed-attention kernels need CUDA tensors (or "
                         f"TRITON_INTERPRET=1 set before import), got {q.device}")
    check_triton_inputs(q, _HEAD_DIMS, "cmp_attn: ")
    for name, t in (("q", q), ("k_cmp", k_cmp), ("v_cmp", v_cmp)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous in the [B, T, H, D] layout "
                             f"(strides {t.stride()}); call .contiguous() first")
    for name, val in (("cmp_block", cmp_block), ("cmp_stride", cmp_stride)):
        if not isinstance(val, int) or val < 1:
            raise ValueError(f"{name}={val!r} must be an int >= 1")
    if not isinstance(q_offset, int) or q_offset < 0:
        raise ValueError(f"q_offset={q_offset!r} must be an int >= 0")
    if cu_seqlens is not None and (not isinstance(cu_seqlens, torch.Tensor)
                                   or cu_seqlens.device != q.device):
        raise ValueError(f"cu_seqlens must be a tensor on q's device ({q.device})")
    if tk is None:
        tk = q_offset + tq if cu_seqlens is None else int(cu_seqlens[-1])
    if not isinstance(tk, int) or q_offset + tq > tk:
        raise ValueError(f"tk={tk!r} must be an int >= q_offset + Tq = {q_offset + tq} "
                         f"(q_offset={q_offset}): queries sit inside the key sequence")
    if max(tq * hq, k_cmp.shape[1] * k_cmp.shape[2], tk) * d >= 2 ** 31:
        raise ValueError(f"T*H*D must be < 2**31 per sequence (int32 offsets), got "
                         f"Tq*Hq*D={tq * hq * d}, Tc*Hkv*D={k_cmp.numel() // B}")
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, B, tk)
        if bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
            raise ValueError("cu_seqlens must be non-decreasing")
    return tk


class _Plan:
    """Checked arguments and, with documents, the int32 bound arrays (module docstring)."""

    def __init__(self, q, k_cmp, v_cmp, scale, cmp_block, cmp_stride, cu_seqlens, q_offset, tk):
        tk = _check(q, k_cmp, v_cmp, cmp_block, cmp_stride, cu_seqlens, q_offset, tk)
        B, tq, hq, d = q.shape
        tc, hkv = k_cmp.shape[1], k_cmp.shape[2]
        if cu_seqlens is None:
            want = num_cmp_blocks(tk, cmp_block, cmp_stride)
        else:
            cu_c = cmp_cu_seqlens(cu_seqlens, cmp_block, cmp_stride)
            want = int(cu_c[-1])
        if tc != want:
            raise ValueError(f"k_cmp has {tc} compressed rows (dim 1), but tk={tk} keys with "
                             f"cmp_block={cmp_block}, cmp_stride={cmp_stride}"
                             f"{' and these cu_seqlens' if cu_seqlens is not None else ''} make "
                             f"{want} (complete blocks per document, see attn/nsa/ref.py)")
        self.bounds = None
        if cu_seqlens is not None and tc > 0 and tq > 0:
            self.bounds = _doc_bounds(cu_seqlens, cu_c, tq, tc, q_offset, cmp_block, cmp_stride)
        self.scale = float(d ** -0.5 if scale is None else scale)
        self.cmp_block, self.cmp_stride, self.q_offset = cmp_block, cmp_stride, q_offset
        self.shape = (B, tq, hq, d, tc, hkv)


def _doc_bounds(cu_seqlens, cu_c, tq, tc, q_offset, cmp_block, cmp_stride):
    """(c_lo, c_hi) int32 [Tq] per query row and (pf, pl) int32 [Tc] per compressed row."""
    cu, cu_c = cu_seqlens.long(), cu_c.long()
    qpos = torch.arange(q_offset, q_offset + tq, device=cu.device)
    doc = torch.searchsorted(cu[1:], qpos, right=True)
    rel = qpos - cu[doc]
    n = torch.where(rel >= cmp_block - 1, (rel - cmp_block + 1).clamp_min(0) // cmp_stride + 1,
                    torch.zeros_like(rel))
    c_lo = cu_c[doc]
    c_hi = torch.minimum(c_lo + n, cu_c[doc + 1])
    c = torch.arange(tc, device=cu.device)
    cdoc = torch.searchsorted(cu_c[1:], c, right=True)
    pf = cu[cdoc] + (c - cu_c[cdoc]) * cmp_stride + cmp_block - 1
    pl = cu[cdoc + 1] - 1
    return tuple(t.to(torch.int32).contiguous() for t in (c_lo, c_hi, pf, pl))


def _fwd(q, k_cmp, v_cmp, plan):
    B, tq, hq, d, tc, hkv = plan.shape
    o = common.empty(q.shape, q.dtype, q.device)
    lse = common.empty((B, hq, tq), torch.float32, q.device)
    if tc == 0 or tq == 0:  # no compressed row at all: every row is empty
        return o.zero_(), lse.fill_(float("inf"))
    has_docs = plan.bounds is not None
    c_lo, c_hi = plan.bounds[:2] if has_docs else (lse, lse)  # dummies, never read
    bm, bn, w, s = _cfg(FWD_CFGS, d, q.dtype)
    _fwd_kernel[(triton.cdiv(tq, bm), B * hq)](
        q, k_cmp, v_cmp, o, lse, c_lo, c_hi, plan.scale * LOG2E_F, plan.q_offset,
        plan.cmp_block, plan.cmp_stride, tq, tc, HQ=hq, HKV=hkv, HEAD_DIM=d, BLOCK_M=bm,
        BLOCK_N=bn, HAS_DOCS=has_docs, DOT_PREC=common.dot_precision(q.dtype), num_warps=w,
        num_stages=s)
    return o, lse


def _bwd(do, q, k_cmp, v_cmp, o, lse, plan):
    B, tq, hq, d, tc, hkv = plan.shape
    dq = common.empty(q.shape, q.dtype, q.device)
    if tc == 0 or tq == 0:
        return dq.zero_(), torch.zeros_like(k_cmp), torch.zeros_like(v_cmp)
    delta = common.empty((B, hq, tq), torch.float32, q.device)
    pre_bm = 16 if common.INTERPRET else 64
    _bwd_preprocess[(triton.cdiv(tq, pre_bm), B * hq)](o, do, delta, tq, H=hq, HEAD_DIM=d,
                                                        BLOCK_M=pre_bm)
    has_docs = plan.bounds is not None
    c_lo, c_hi, pf, pl = plan.bounds if has_docs else (delta,) * 4  # dummies, never read
    args = (plan.scale, plan.scale * LOG2E_F, plan.q_offset, plan.cmp_block, plan.cmp_stride,
            tq, tc)
    meta = dict(HQ=hq, HKV=hkv, HEAD_DIM=d, HAS_DOCS=has_docs,
                DOT_PREC=common.dot_precision(q.dtype))
    bm, bn, w, s = _cfg(DQ_CFGS, d, q.dtype)  # first: it replaces delta by the exact one
    _dq_kernel[(triton.cdiv(tq, bm), B * hq)](
        q, k_cmp, v_cmp, do, lse, delta, dq, c_lo, c_hi, *args, **meta, BLOCK_M=bm,
        BLOCK_N=bn, num_warps=w, num_stages=s)
    bm, bn, w, s = _cfg(DKDV_CFGS, d, q.dtype)
    grid = (triton.cdiv(tc, bn), B * hkv)
    chunk = _dkdv_chunk(tq, grid[0] * grid[1], bm)
    splits = triton.cdiv(tq, chunk)
    if splits > 1:
        dk_out = common.empty((splits, *k_cmp.shape), torch.float32, q.device)
        dv_out = common.empty((splits, *v_cmp.shape), torch.float32, q.device)
    else:
        dk_out = dk = common.empty(k_cmp.shape, k_cmp.dtype, q.device)
        dv_out = dv = common.empty(v_cmp.shape, v_cmp.dtype, q.device)
    _dkdv_kernel[(*grid, splits)](
        q, k_cmp, v_cmp, do, lse, delta, dk_out, dv_out, pf, pl, *args, chunk, **meta,
        BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)
    if splits > 1:  # fixed-order sum: deterministic
        dk, dv = dk_out.sum(0).to(k_cmp.dtype), dv_out.sum(0).to(v_cmp.dtype)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# public functions

def cmp_attn_fwd(q, k_cmp, v_cmp, *, scale, cmp_block, cmp_stride, cu_seqlens=None, q_offset=0,
                 tk=None):
    """Forward (no autograd): (o [B, Tq, Hq, D] q.dtype, lse [B, Hq, Tq] fp32, natural log;
    rows that see no compressed row get o = 0, lse = +inf). scale None: D**-0.5."""
    plan = _Plan(q, k_cmp, v_cmp, scale, cmp_block, cmp_stride, cu_seqlens, q_offset, tk)
    return _fwd(q, k_cmp, v_cmp, plan)


def cmp_attn_bwd(do, q, k_cmp, v_cmp, o, lse, *, scale, cmp_block, cmp_stride, cu_seqlens=None,
                 q_offset=0, tk=None):
    """Backward: (dq, dk_cmp, dv_cmp) shaped like q, k_cmp, v_cmp from dO and the forward's
    o, lse. Deterministic (no atomics)."""
    plan = _Plan(q, k_cmp, v_cmp, scale, cmp_block, cmp_stride, cu_seqlens, q_offset, tk)
    B, tq, hq = q.shape[:3]
    if do.shape != q.shape or o.shape != q.shape:
        raise ValueError(f"do {tuple(do.shape)} and o {tuple(o.shape)} must have q's shape "
                         f"{tuple(q.shape)}")
    if lse.shape != (B, hq, tq) or lse.dtype != torch.float32:
        raise ValueError(f"lse must be float32 [B, Hq, Tq] = {(B, hq, tq)}, got {lse.dtype} "
                         f"{tuple(lse.shape)}")
    if do.dtype != q.dtype or o.dtype != q.dtype:
        raise ValueError(f"do and o must be in q's dtype {q.dtype}, got {do.dtype}, {o.dtype}")
    return _bwd(do.contiguous(), q, k_cmp, v_cmp, o.contiguous(), lse.contiguous(), plan)


class CmpAttnFunction(torch.autograd.Function):
    """(o, lse) = compressed attention; gradients for q, k_cmp, v_cmp (lse: none)."""

    @staticmethod
    def forward(ctx, q, k_cmp, v_cmp, scale, cmp_block, cmp_stride, cu_seqlens, q_offset, tk):
        plan = _Plan(q, k_cmp, v_cmp, scale, cmp_block, cmp_stride, cu_seqlens, q_offset, tk)
        o, lse = _fwd(q, k_cmp, v_cmp, plan)
        ctx.save_for_backward(q, k_cmp, v_cmp, o, lse)
        ctx.plan = plan
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k_cmp, v_cmp, o, lse = ctx.saved_tensors
        dq, dk, dv = _bwd(do.contiguous(), q, k_cmp, v_cmp, o, lse, ctx.plan)
        return dq, dk, dv, None, None, None, None, None, None


def cmp_attn(q, k_cmp, v_cmp, *, scale=None, cmp_block=32, cmp_stride=16, cu_seqlens=None,
             q_offset=0, tk=None):
    """NSA compressed-branch attention with the Triton kernels: (o, lse), see the module
    docstring; differentiable w.r.t. q, k_cmp, v_cmp."""
    return CmpAttnFunction.apply(q, k_cmp, v_cmp, scale, cmp_block, cmp_stride, cu_seqlens,
                                 q_offset, tk)
