"""NSA compressed branch in Triton: softmax attention over the compressed keys, forward (o, lse)
and a deterministic backward (dq, dk_cmp, dv_cmp; its kernels are in cmp_bwd.py). The definition
is attn/nsa/ref.py's `cmp_attn_ref` (compressed layout, documents and q_offset: see ref.py's
module docstring).

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
from attn.flash.common import LN2, LOG2E_F, cvt, mma
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
    # int64 base of the query tile (Tq·Hq·D may pass 2^31), int32 offsets inside it
    q_off = (b.to(tl.int64) * Tq + pid_m * BLOCK_M) * (HQ * HEAD_DIM) + h * HEAD_DIM \
        + (tl.arange(0, BLOCK_M)[:, None] * (HQ * HEAD_DIM) + tl.arange(0, HEAD_DIM)[None, :])
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
    tile = offs_n[:, None] * STRIDE_KT + offs_d[None, :]  # int32 offsets inside one key chunk
    for start_n in range(start, end, BLOCK_N):
        c = start_n + offs_n
        # the chunk's first row in int64 (Tc·Hkv·D may pass 2^31)
        row = tl.cast(start_n, tl.int64) * STRIDE_KT
        k = _ld(k_base + row + tile, (c < Tc)[:, None], MASKED)
        s = mma(q, tl.trans(k), None, DOT_PREC) * qk_scale
        if MASKED:
            ok = (c[None, :] >= lo[:, None]) & (c[None, :] < hi[:, None])
            s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = _ld(v_base + row + tile, (c < Tc)[:, None], MASKED)
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


# ---------------------------------------------------------------------------------------------
# launch

# (BLOCK_M, BLOCK_N, warps, stages) by head dim (common.pick_dim: fp32 takes the entry of 2*D).
# H100, bf16, D = 128, T = 64k (Tc = 4k), cmp 32/16, triton 3.6. Hq = 64, Hkv = 4: forward
# 9.9 ms (445 TFLOP/s; 128x128/8/3 430, 64x64/4/3 421, 128x64/4/3 313), backward 35.6 ms (dQ
# 15, dK/dV 20; dQ 128x64/8/3 best of six; dK/dV 64x128/8/2 36 ms for the whole backward,
# 64x64/4/3 38, 128x64/8/2 52, 64x64/8/2 55, 64x32/4/3 59; 8/3 beat 8/2 by 5% at Hq = 16).
# Hq = 16: Hkv = 4 2.5 / 9.5 ms, Hkv = 16 2.5 / 8.6 ms (forward / backward).
FWD_CFGS = {64: (128, 64, 4, 3), 128: (128, 64, 8, 3), 256: (64, 32, 4, 2)}
INTERP_BLOCKS = (16, 16, 4, 1)  # interpreter: small tiles, many tile edges


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
    # (T·H·D may pass 2^31: the kernels offset rows in int64; positions stay int32)
    if tk >= 2 ** 30:
        raise ValueError(f"tk={tk} must be < 2**30 (int32 positions; the kernels use 2**30 as "
                         "'past every position')")
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, B, tk)
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


# ---------------------------------------------------------------------------------------------
# public functions

def cmp_attn_fwd(q, k_cmp, v_cmp, *, scale, cmp_block, cmp_stride, cu_seqlens=None, q_offset=0,
                 tk=None):
    """Forward (no autograd): (o [B, Tq, Hq, D] q.dtype, lse [B, Hq, Tq] fp32, natural log;
    rows that see no compressed row get o = 0, lse = +inf). scale None: D**-0.5."""
    plan = _Plan(q, k_cmp, v_cmp, scale, cmp_block, cmp_stride, cu_seqlens, q_offset, tk)
    return _fwd(q, k_cmp, v_cmp, plan)


def cmp_attn_bwd(do, q, k_cmp, v_cmp, o, lse, *, scale, cmp_block, cmp_stride, cu_seqlens=None,
                 q_offset=0, tk=None, delta=None):
    """Backward: (dq, dk_cmp, dv_cmp) shaped like q, k_cmp, v_cmp from dO and the forward's
    o, lse. Deterministic (no atomics). delta: rowsum(o·do) fp32 [B, Hq, Tq] if the caller has
    it (attn/nsa/gate_mix.py does; overwritten with the exact delta), else computed here."""
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
    common.check_bwd_buffers(q, delta, None, "cmp_attn_bwd: ")
    from attn.nsa.cmp_bwd import _bwd
    return _bwd(do.contiguous(), q, k_cmp, v_cmp, o.contiguous(), lse.contiguous(), plan, delta)


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
        from attn.nsa.cmp_bwd import _bwd
        dq, dk, dv = _bwd(do.contiguous(), q, k_cmp, v_cmp, o, lse, ctx.plan)
        return dq, dk, dv, None, None, None, None, None, None


def cmp_attn(q, k_cmp, v_cmp, *, scale=None, cmp_block=32, cmp_stride=16, cu_seqlens=None,
             q_offset=0, tk=None):
    """NSA compressed-branch attention with the Triton kernels: (o, lse), see the module
    docstring; differentiable w.r.t. q, k_cmp, v_cmp."""
    return CmpAttnFunction.apply(q, k_cmp, v_cmp, scale, cmp_block, cmp_stride, cu_seqlens,
                                 q_offset, tk)
