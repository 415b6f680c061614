"""NSA compressed branch in Triton: softmax attention over the compressed keys, forward (o, lse)
and a deterministic backward (cmp_bwd.py). Definition: attn/nsa/ref.py's `cmp_attn_ref`.

    cmp_attn_fwd(q, k_cmp, v_cmp, *, scale, cmp_block, cmp_stride, cu_seqlens, q_offset, tk)
        -> (o [B, Tq, Hq, D] q.dtype, lse [B, Hq, Tq] fp32, natural log, +inf for empty rows)
    cmp_attn_bwd(do, q, k_cmp, v_cmp, o, lse, *, same keywords) -> (dq, dk_cmp, dv_cmp)
    cmp_attn(q, k_cmp, v_cmp, *, same keywords) -> (o, lse), differentiable w.r.t. q, k_cmp, v_cmp

Kernels (cmp_plan.CMP_IMPL, NSA_CMP_IMPL): triton is this file's forward and cmp_bwd.py's
backward; gluon runs the forward through attn/flash/fwd_gluon.py's warp-specialized kernel in its
pooled-key mode and the dK/dV through cmp_bwd_gluon.py (Hopper, 16-bit, D 64 / 128, Tq a multiple
of 128 when B > 1; an error naming the rule outside that scope); auto (default) takes gluon within
that scope (H200, 64k, 64 / 4 heads: the NSA layer 4.5 % faster, docs/nsa_notes.md), triton
otherwise. The dQ kernel is cmp_bwd.py's in all.

Memory plan (forward; exp2 domain s2 = q.k * scale * log2(e)): one program = BLOCK_M query rows
of one (batch, query head). Registers: Q tile [BLOCK_M, D], fp32 accumulator [BLOCK_M, D], running
max / sum [BLOCK_M], one score tile [BLOCK_M, BLOCK_N]. Streams K_cmp, V_cmp tiles [BLOCK_N, D]
of the query head's KV head (GQA: shared rows, never a repeated copy). Writes O, lse once.
Masking: masked / unmasked / masked key tiles from the rows' bounds (cmp_plan.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from attn.common import alloc
from attn.common.checks import check_bwd_buffers
from attn.common.jit import LN2, LOG2E_F, cvt, mma
from attn.common.launch import dot_precision
from attn.nsa.cmp_bwd import bwd_triton
from attn.nsa import cmp_plan
from attn.nsa.cmp_plan import CmpPlan, launch_cfg, q_tile, row_bounds, tile_load


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, start, end, lo, hi, Tc, qk_scale,
               STRIDE_KT: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
               MASKED: tl.constexpr, DOT_PREC: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    tile = offs_n[:, None] * STRIDE_KT + offs_d[None, :]  # int32 offsets inside one key chunk
    for start_n in range(start, end, BLOCK_N):
        c = start_n + offs_n
        # the chunk's first row in int64 (Tc·Hkv·D may pass 2^31)
        row = tl.cast(start_n, tl.int64) * STRIDE_KT
        k = tile_load(k_base + row + tile, (c < Tc)[:, None], MASKED)
        s = mma(q, tl.trans(k), None, DOT_PREC) * qk_scale
        if MASKED:
            ok = (c[None, :] >= lo[:, None]) & (c[None, :] < hi[:, None])
            s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = tile_load(v_base + row + tile, (c < Tc)[:, None], MASKED)
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
    rows, r_ok, q_off, kv_base, lo, hi, kv_lo, f_lo, f_hi, kv_hi = q_tile(
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


# ---------------------------------------------------------------------------------------------
# launch

# (BLOCK_M, BLOCK_N, warps, stages) by head dim (pick_dim: fp32 takes the entry of 2*D): the
# sweep's fastest (docs/nsa_notes.md)
FWD_CFGS = {64: (128, 64, 4, 3), 128: (128, 64, 8, 3), 256: (64, 32, 4, 2)}


def fwd(q, k_cmp, v_cmp, plan):
    """(o, lse) of the checked arguments in `plan` (CmpPlan) through the kernel NSA_CMP_IMPL
    selects (module docstring)."""
    B, tq, hq, d, tc, hkv = plan.shape
    if tc == 0 or tq == 0:  # no compressed row at all: every row is empty
        return (alloc.empty(q.shape, q.dtype, q.device).zero_(),
                alloc.empty((B, hq, tq), torch.float32, q.device).fill_(float("inf")))
    if cmp_plan.gluon_kernels(q, k_cmp, "Gluon flash forward"):
        from attn.flash.fwd_gluon import pooled_fwd_gluon
        return pooled_fwd_gluon(q, k_cmp, v_cmp, plan.scale, row_bounds(plan))
    return fwd_triton(q, k_cmp, v_cmp, plan)


def fwd_triton(q, k_cmp, v_cmp, plan):
    """(o, lse) of the checked arguments in `plan` (CmpPlan), at least one query row and one
    compressed row, through this file's kernel."""
    B, tq, hq, d, tc, hkv = plan.shape
    o = alloc.empty(q.shape, q.dtype, q.device)
    lse = alloc.empty((B, hq, tq), torch.float32, q.device)
    has_docs = plan.bounds is not None
    c_lo, c_hi = plan.bounds[:2] if has_docs else (lse, lse)  # dummies, never read
    bm, bn, w, s = launch_cfg(FWD_CFGS, d, q.dtype)
    _fwd_kernel[(triton.cdiv(tq, bm), B * hq)](
        q, k_cmp, v_cmp, o, lse, c_lo, c_hi, plan.scale * LOG2E_F, plan.q_offset,
        plan.cmp_block, plan.cmp_stride, tq, tc, HQ=hq, HKV=hkv, HEAD_DIM=d, BLOCK_M=bm,
        BLOCK_N=bn, HAS_DOCS=has_docs, DOT_PREC=dot_precision(q.dtype), num_warps=w,
        num_stages=s)
    return o, lse


# ---------------------------------------------------------------------------------------------
# public functions

def cmp_attn_fwd(q, k_cmp, v_cmp, *, scale, cmp_block, cmp_stride, cu_seqlens=None, q_offset=0,
                 tk=None):
    """Forward (no autograd): (o [B, Tq, Hq, D] q.dtype, lse [B, Hq, Tq] fp32, natural log;
    rows that see no compressed row get o = 0, lse = +inf). scale None: D**-0.5."""
    plan = CmpPlan(q, k_cmp, v_cmp, scale, cmp_block, cmp_stride, cu_seqlens, q_offset, tk)
    return fwd(q, k_cmp, v_cmp, plan)


def cmp_attn_bwd(do, q, k_cmp, v_cmp, o, lse, *, scale, cmp_block, cmp_stride, cu_seqlens=None,
                 q_offset=0, tk=None, delta=None):
    """Backward: (dq, dk_cmp, dv_cmp) shaped like q, k_cmp, v_cmp from dO and the forward's
    o, lse. Deterministic (no atomics). delta: rowsum(o·do) fp32 [B, Hq, Tq] if the caller has
    it (attn/nsa/gate_mix.py does; overwritten with the exact delta), else computed here."""
    plan = CmpPlan(q, k_cmp, v_cmp, scale, cmp_block, cmp_stride, cu_seqlens, q_offset, tk)
    B, tq, hq = q.shape[:3]
    if do.shape != q.shape or o.shape != q.shape:
        raise ValueError(f"do {tuple(do.shape)} and o {tuple(o.shape)} must have q's shape "
                         f"{tuple(q.shape)}")
    if lse.shape != (B, hq, tq) or lse.dtype != torch.float32:
        raise ValueError(f"lse must be float32 [B, Hq, Tq] = {(B, hq, tq)}, got {lse.dtype} "
                         f"{tuple(lse.shape)}")
    if do.dtype != q.dtype or o.dtype != q.dtype:
        raise ValueError(f"do and o must be in q's dtype {q.dtype}, got {do.dtype}, {o.dtype}")
    check_bwd_buffers(q, delta, None, "cmp_attn_bwd: ")
    return bwd_triton(do.contiguous(), q, k_cmp, v_cmp, o.contiguous(), lse.contiguous(), plan,
                      delta)


class CmpAttnFunction(torch.autograd.Function):
    """(o, lse) = compressed attention; gradients for q, k_cmp, v_cmp (lse: none)."""

    @staticmethod
    def forward(ctx, q, k_cmp, v_cmp, scale, cmp_block, cmp_stride, cu_seqlens, q_offset, tk):
        plan = CmpPlan(q, k_cmp, v_cmp, scale, cmp_block, cmp_stride, cu_seqlens, q_offset, tk)
        o, lse = fwd(q, k_cmp, v_cmp, plan)
        ctx.save_for_backward(q, k_cmp, v_cmp, o, lse)
        ctx.plan = plan
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k_cmp, v_cmp, o, lse = ctx.saved_tensors
        dq, dk, dv = bwd_triton(do.contiguous(), q, k_cmp, v_cmp, o, lse, ctx.plan)
        return dq, dk, dv, None, None, None, None, None, None


def cmp_attn(q, k_cmp, v_cmp, *, scale=None, cmp_block=32, cmp_stride=16, cu_seqlens=None,
             q_offset=0, tk=None):
    """NSA compressed-branch attention with the Triton kernels: (o, lse), see the module
    docstring; differentiable w.r.t. q, k_cmp, v_cmp."""
    return CmpAttnFunction.apply(q, k_cmp, v_cmp, scale, cmp_block, cmp_stride, cu_seqlens,
                                 q_offset, tk)
