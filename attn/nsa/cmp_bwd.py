"""NSA compressed branch, backward kernels and their launch (masking: cmp_plan.py).

Memory plan (fp32 accumulators; P = exp2(s2 - lse2) from the saved lse, +inf gives P = 0):
  preprocess : delta = rowsum(O * dO) fp32 [B, Hq, Tq] (attn/common/softmax.py).
  dQ         : one program = BLOCK_M query rows of one (batch, query head), like the forward;
               writes dQ once and replaces its rows of delta by the exact delta (below).
  dK/dV      : one program = BLOCK_N compressed rows of one (batch, KV head) and one split of
               the query rows (cmp_plan.dkdv_chunk). Registers: K, V tiles and dK, dV
               [BLOCK_N, D]; loops over the G query heads of the group and the query tiles of
               its split that see the key tile, streaming Q, dO [BLOCK_M, D], lse, delta. Writes dK, dV once (several
               splits: fp32 partials, summed in a fixed order). No atomics: deterministic.
dV = P^T dO, dS = P * (dO V^T - delta), dK = scale * dS^T Q, dQ = scale * dS K: the math and the
streaming loops are attn/common/softmax_bwd.py's (dkdv_heads, dq_ranges with MASK_BOUNDS, the
bounds above); this file decides the tiles, splits and the exact delta's epilogue.
Exact delta: rowsum(O * dO) uses O rounded to bf16/fp16, whose error doubles dQ's on rows that see
few compressed rows; the dQ kernel also accumulates PK = P K and delta* = rowsum(P * dP) in fp32,
returns dQ = dS K - (delta* - delta) PK and hands delta* to dK/dV.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from attn.common import alloc
from attn.common.jit import LOG2E, LOG2E_F, cvt
from attn.common.launch import dot_precision, use_tma
from attn.common.softmax import bwd_delta
from attn.common.softmax_bwd import MASK_BOUNDS, dkdv_heads, dq_ranges
from attn.nsa import cmp_plan
from attn.nsa.cmp_plan import BIG, dkdv_chunk, launch_cfg, q_tile


@triton.jit
def _dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, PF, PL, scale, qk_scale, q_offset, cmp_block,
                 cmp_stride, Tq, Tc, chunk,
                 HQ: tl.constexpr, HKV: tl.constexpr, HEAD_DIM: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_DOCS: tl.constexpr,
                 DOT_PREC: tl.constexpr, TMA: tl.constexpr):
    # compressed tile 0 is seen by the most queries: program 0 is the heaviest, it runs first.
    # Axis 2 splits the query rows (see cmp_plan.dkdv_chunk).
    start_n = tl.program_id(0) * BLOCK_N
    pid_bh = tl.program_id(1)
    b = pid_bh // HKV
    hkv = pid_bh % HKV
    STRIDE_KT: tl.constexpr = HKV * HEAD_DIM
    c = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    c_ok = c < Tc
    # int64 base of the compressed-key tile (Tc·Hkv·D may pass 2^31), int32 offsets inside it
    kv_off = (b.to(tl.int64) * Tc + start_n) * STRIDE_KT + hkv * HEAD_DIM \
        + (tl.arange(0, BLOCK_N)[:, None] * STRIDE_KT + offs_d[None, :])
    k = tl.load(K + kv_off, mask=c_ok[:, None], other=0.0)
    v = tl.load(V + kv_off, mask=c_ok[:, None], other=0.0)
    # positions [pf, pl] that see each compressed row; padding rows: the empty [BIG, -1]
    if HAS_DOCS:
        pf = tl.load(PF + c, mask=c_ok, other=BIG)
        pl = tl.load(PL + c, mask=c_ok, other=-1)
    else:
        pf = tl.where(c_ok, c * cmp_stride + cmp_block - 1, BIG)
        pl = tl.where(c_ok, BIG, -1)

    # query rows (row = position - q_offset) inside this program's split [r0, r1) (chunk: a
    # multiple of BLOCK_M): [m_lo, f_lo) masked, [f_lo, f_hi) unmasked (every row sees every
    # key of the tile), [f_hi, m_hi) masked
    r0 = tl.program_id(2) * chunk
    r1 = tl.minimum(r0 + chunk, Tq)
    m_lo = tl.maximum((tl.maximum(tl.min(pf, 0) - q_offset, 0) // BLOCK_M) * BLOCK_M, r0)
    m_hi = tl.minimum(tl.max(pl, 0) - q_offset + 1, r1)
    pf_last = tl.max(tl.where(c_ok, pf, 0), 0)
    f_lo = tl.maximum(tl.cdiv(tl.maximum(pf_last - q_offset, 0), BLOCK_M) * BLOCK_M, m_lo)
    pl_first = tl.min(tl.where(c_ok, pl, BIG), 0)
    f_hi = (tl.maximum(tl.minimum(pl_first - q_offset + 1, r1), 0) // BLOCK_M) * BLOCK_M
    if f_hi <= f_lo:
        f_lo = m_lo
        f_hi = m_lo

    # MASK_BOUNDS with each compressed row's positions [pf, pl] (SEG_START, window unused);
    # lse +inf on rows past Tq and the JUST_IN_TIME order: the schedule this kernel was tuned with
    dk, dv = dkdv_heads(k, v, Q, DO, LSE, DELTA, b, hkv, m_lo, f_lo, f_hi, m_hi, pf, pl, PF, 0,
                        q_offset, Tq, qk_scale, HQ, HKV, HEAD_DIM, BLOCK_M, BLOCK_N, MASK_BOUNDS,
                        False, False, float("inf"), True, DOT_PREC, TMA)
    # one split: dK, dV in the KV dtype; several: fp32 partials [splits, B, Tc, Hkv, D]
    out = kv_off + tl.program_id(2).to(tl.int64) * tl.num_programs(1) * Tc * HEAD_DIM
    tl.store(DK + out, cvt(dk * scale, DK.dtype.element_ty), mask=c_ok[:, None])
    tl.store(DV + out, cvt(dv, DV.dtype.element_ty), mask=c_ok[:, None])


@triton.jit
def _dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, CLO, CHI, GATE, scale, qk_scale, q_offset, cmp_block,
               cmp_stride, Tq, Tc,
               HQ: tl.constexpr, HKV: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_DOCS: tl.constexpr,
               DOT_PREC: tl.constexpr, TMA: tl.constexpr, N_GATES: tl.constexpr):
    """N_GATES > 0: LSE is lse − ln g (attn/nsa/gate_mix.py's folded backward), so every P here
    is g·P and the exact delta is rowsum(g·P·dP) / g; GATE [B, Tq, HQ, N_GATES], g in channel
    0."""
    pid_bh = tl.program_id(1)  # heaviest (last) query tiles first
    rows, r_ok, q_off, kv_base, lo, hi, kv_lo, f_lo, f_hi, kv_hi = q_tile(
        tl.num_programs(0) - 1 - tl.program_id(0), pid_bh, q_offset, CLO, CHI, cmp_block,
        cmp_stride, Tq, Tc, HQ, HKV, HEAD_DIM, BLOCK_M, BLOCK_N, HAS_DOCS)
    k_base = K + kv_base
    v_base = V + kv_base
    q = tl.load(Q + q_off, mask=r_ok[:, None], other=0.0)
    do = tl.load(DO + q_off, mask=r_ok[:, None], other=0.0)
    # lse = +inf (empty or padding row) makes every P of the row 0
    lse2 = tl.load(LSE + pid_bh.to(tl.int64) * Tq + rows, mask=r_ok, other=float("inf")) * LOG2E
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * Tq + rows, mask=r_ok, other=0.0)

    # MASK_BOUNDS: each row's compressed rows [lo, hi); EXACT_DELTA: also P·K and rowsum(P·dP)
    dq, pk, dsum = dq_ranges(q, do, lse2, delta, K, V, k_base, v_base, pid_bh // HQ,
                             (pid_bh % HQ) // (HQ // HKV), kv_lo, f_lo, f_hi, kv_hi, rows, lo, hi,
                             Tc, qk_scale, HKV, HEAD_DIM, BLOCK_M, BLOCK_N, MASK_BOUNDS, True,
                             DOT_PREC, TMA)
    # delta correction (see the module docstring): dsum is the exact delta
    if N_GATES > 0:
        g_off = ((pid_bh // HQ).to(tl.int64) * Tq + rows) * (HQ * N_GATES) \
            + (pid_bh % HQ) * N_GATES
        g = tl.load(GATE + g_off, mask=r_ok, other=0.0).to(tl.float32)
        dsum = tl.where(g > 0, dsum / g, 0.0)  # g = 0: P, pk and dq are all 0 anyway
    dq = dq - (dsum - delta)[:, None] * pk
    tl.store(DQ + q_off, cvt(dq * scale, DQ.dtype.element_ty), mask=r_ok[:, None])
    tl.store(DELTA + pid_bh.to(tl.int64) * Tq + rows, dsum, mask=r_ok)  # for the dK/dV kernel


# ---------------------------------------------------------------------------------------------
# launch

# TMA tensor descriptors for the streamed tiles (Q, dO in dK/dV; compressed K, V in dQ), as in
# attn/flash (fewer address registers); use_tma decides per launch (Hopper, alignment,
# FLASH_TMA), NSA_CMP_TMA=0 turns it off here alone
TMA = {kind: os.environ.get("NSA_CMP_TMA", "1") != "0" for kind in ("dq", "dkdv")}
# (BLOCK_M, BLOCK_N, warps, stages) by head dim: the sweep's fastest (docs/nsa_notes.md).
# dK/dV: BLOCK_N compressed rows resident, BLOCK_M query rows streamed
DKDV_CFGS = {64: (64, 64, 4, 3), 128: (64, 128, 8, 3), 256: (32, 64, 4, 2)}
# dQ: BLOCK_M query rows resident, BLOCK_N compressed rows streamed
DQ_CFGS = {64: (128, 64, 4, 3), 128: (128, 64, 8, 3), 256: (64, 32, 4, 2)}

def bwd_triton(do, q, k_cmp, v_cmp, o, lse, plan, delta=None, gates=None):
    """delta: rowsum(o·do) fp32 [B, Hq, Tq] when the caller has it (overwritten by the exact
    one); else computed here. gates: the packed gates [B, Tq, Hq, 3 or 2] when lse is the folded
    lse − ln g_cmp and delta rowsum(O·dO) of the ungated dO (attn/nsa/gate_mix.py)."""
    B, tq, hq, d, tc, hkv = plan.shape
    dq = alloc.empty(q.shape, q.dtype, q.device)
    if tc == 0 or tq == 0:
        return dq.zero_(), torch.zeros_like(k_cmp), torch.zeros_like(v_cmp)
    if delta is None:
        delta = bwd_delta(o, do)
    has_docs = plan.bounds is not None
    c_lo, c_hi, pf, pl = plan.bounds if has_docs else (delta,) * 4  # dummies, never read
    args = (plan.scale, plan.scale * LOG2E_F, plan.q_offset, plan.cmp_block, plan.cmp_stride,
            tq, tc)
    meta = dict(HQ=hq, HKV=hkv, HEAD_DIM=d, HAS_DOCS=has_docs,
                DOT_PREC=dot_precision(q.dtype))
    bm, bn, w, s = launch_cfg(DQ_CFGS, d, q.dtype)  # first: it replaces delta by the exact one
    _dq_kernel[(triton.cdiv(tq, bm), B * hq)](
        q, k_cmp, v_cmp, do, lse, delta, dq, c_lo, c_hi, delta if gates is None else gates, *args,
        **meta, BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s,
        TMA=TMA["dq"] and use_tma("dq", k_cmp, v_cmp),
        N_GATES=0 if gates is None else gates.shape[-1])
    if cmp_plan.gluon_kernels(q, k_cmp, "Gluon compressed dK/dV kernel"):
        from attn.nsa.cmp_bwd_gluon import dkdv_pooled_gluon
        dk, dv = dkdv_pooled_gluon(do, q, k_cmp, v_cmp, lse, delta, plan)
        return dq, dk, dv
    bm, bn, w, s = launch_cfg(DKDV_CFGS, d, q.dtype)
    grid = (triton.cdiv(tc, bn), B * hkv)
    chunk = dkdv_chunk(tq, grid[0] * grid[1], bm)
    splits = triton.cdiv(tq, chunk)
    if splits > 1:
        dk_out = alloc.empty((splits, *k_cmp.shape), torch.float32, q.device)
        dv_out = alloc.empty((splits, *v_cmp.shape), torch.float32, q.device)
    else:
        dk_out = dk = alloc.empty(k_cmp.shape, k_cmp.dtype, q.device)
        dv_out = dv = alloc.empty(v_cmp.shape, v_cmp.dtype, q.device)
    _dkdv_kernel[(*grid, splits)](
        q, k_cmp, v_cmp, do, lse, delta, dk_out, dv_out, pf, pl, *args, chunk, **meta,
        BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s,
        TMA=TMA["dkdv"] and use_tma("dkdv", q, do))
    if splits > 1:  # fixed-order sum: deterministic
        dk, dv = dk_out.sum(0).to(k_cmp.dtype), dv_out.sum(0).to(v_cmp.dtype)
    return dq, dk, dv
