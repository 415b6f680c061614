"""Forward kernel: causal softmax attention with online softmax, returns O and the lse.

Memory plan (one program = BLOCK_M query rows of one (batch, query head)):
  registers : Q tile [BLOCK_M, D] (input dtype), accumulator [BLOCK_M, D] fp32, running max m
              and running sum l [BLOCK_M] fp32, one score tile [BLOCK_M, BLOCK_N] fp32
  streamed  : K and V tiles [BLOCK_N, D] of the query head's KV head (GQA: heads of a group
              read the same K/V rows, never a repeated copy), num_stages deep in shared memory
  HBM writes: O once [BLOCK_M, D] (input dtype), lse once [BLOCK_M] fp32
Scores live in the log2 domain: s2 = (q.k) * scale * log2(e), so every exponential is exp2 and
the scale costs one multiply per score. Masking: see common.py (three key ranges; blocks
outside [lo(first row), last row] are never loaded).
FP8 (inference option, op.flash_fwd_fp8): Q and K arrive as float8 e4m3 with fp32 scales per
(token, head); the score tile is multiplied by the outer product of row and key scales.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from attn.common import alloc
from attn.common.jit import LN2, LOG2E_F, cvt, mma
from attn.common.launch import dot_precision, pick_dim
from attn.common.softmax import row_lo, softmax_step
from attn.dispatch import INTERPRET
from attn.flash import common
from attn.flash.common import heavy_first, row_lo_scalar


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, ks_base, start, end, qpos, lo, Tk, qk_scale,
               STRIDE_KT: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
               HKV: tl.constexpr, MASKED: tl.constexpr, FP8: tl.constexpr,
               DOT_PREC: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    tile = offs_n[:, None] * STRIDE_KT + offs_d[None, :]  # int32 offsets inside one key chunk
    for start_n in range(start, end, BLOCK_N):
        kpos = start_n + offs_n
        # the chunk's first row in int64 (Tk·Hkv·D may pass 2^31), the tile's offsets in int32
        row = tl.cast(start_n, tl.int64) * STRIDE_KT
        k_ptrs = k_base + row + tile
        v_ptrs = v_base + row + tile
        if MASKED:
            k = tl.load(k_ptrs, mask=(kpos < Tk)[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
        s = mma(q, tl.trans(k), None, DOT_PREC)
        if FP8:  # per-token scales: qk_scale holds the query rows' scales already
            ks = tl.load(ks_base + kpos * HKV, mask=kpos < Tk, other=0.0)
            s = s * qk_scale[:, None] * ks[None, :]
        else:
            s = s * qk_scale
        if MASKED:
            ok = (kpos[None, :] <= qpos[:, None]) & (kpos[None, :] >= lo[:, None]) \
                & (kpos < Tk)[None, :]
            s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if MASKED:
            v = tl.load(v_ptrs, mask=(kpos < Tk)[:, None], other=0.0)
        else:
            v = tl.load(v_ptrs)
        acc = mma(cvt(p, v.dtype), v, acc, DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _qk(q, k_base, start_n, Tk, STRIDE_KT: tl.constexpr, BLOCK_N: tl.constexpr,
        HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, DOT_PREC: tl.constexpr):
    """Raw scores q·k^T of the key chunk at start_n (unscaled, unmasked: their first use is
    the softmax step, so an asynchronous product is not waited for before then)."""
    offs_n = tl.arange(0, BLOCK_N)
    tile = offs_n[:, None] * STRIDE_KT + tl.arange(0, HEAD_DIM)[None, :]
    k_ptrs = k_base + tl.cast(start_n, tl.int64) * STRIDE_KT + tile
    if MASKED:
        k = tl.load(k_ptrs, mask=(start_n + offs_n < Tk)[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
    return mma(q, tl.trans(k), None, DOT_PREC)


@triton.jit
def _softmax_pv(acc, l_i, m_i, s, start_n, v_base, ks_base, qpos, lo, Tk, qk_scale,
                STRIDE_KT: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                HKV: tl.constexpr, MASKED: tl.constexpr, FP8: tl.constexpr,
                DOT_PREC: tl.constexpr):
    """The online-softmax step of _fwd_inner on the raw scores s of the chunk at start_n."""
    kpos = start_n + tl.arange(0, BLOCK_N)
    if FP8:
        ks = tl.load(ks_base + kpos * HKV, mask=kpos < Tk, other=0.0)
        s = s * qk_scale[:, None] * ks[None, :]
    else:
        s = s * qk_scale
    if MASKED:
        ok = (kpos[None, :] <= qpos[:, None]) & (kpos[None, :] >= lo[:, None]) \
            & (kpos < Tk)[None, :]
        s = tl.where(ok, s, float("-inf"))
    tile = tl.arange(0, BLOCK_N)[:, None] * STRIDE_KT + tl.arange(0, HEAD_DIM)[None, :]
    v_ptrs = v_base + tl.cast(start_n, tl.int64) * STRIDE_KT + tile
    if MASKED:
        v = tl.load(v_ptrs, mask=(kpos < Tk)[:, None], other=0.0)
    else:
        v = tl.load(v_ptrs)
    acc, m_i, l_i = softmax_step(s, v, acc, m_i, l_i, DOT_PREC)
    return acc, l_i, m_i


@triton.jit
def _fwd_inner_ahead(acc, l_i, m_i, q, k_base, v_base, ks_base, start, end, qpos, lo, Tk,
                     qk_scale, STRIDE_KT: tl.constexpr, BLOCK_N: tl.constexpr,
                     HEAD_DIM: tl.constexpr, HKV: tl.constexpr, MASKED: tl.constexpr,
                     FP8: tl.constexpr, DOT_PREC: tl.constexpr):
    """_fwd_inner with the scores one chunk ahead (FLASH_FWD_AHEAD=1): the product q·k^T of
    chunk j+1 is issued before the softmax of chunk j, so on Hopper the tensor cores can run it
    while the softmax's exp2 and row sums run (FlashAttention-3's intra-warpgroup overlap).
    Costs one more fp32 score tile in registers. Same results as _fwd_inner, bit for bit."""
    n = tl.cdiv(end - start, BLOCK_N)
    if n > 0:
        s = _qk(q, k_base, start, Tk, STRIDE_KT, BLOCK_N, HEAD_DIM, MASKED, DOT_PREC)
        for j in range(0, n - 1):
            start_n = start + j * BLOCK_N
            s_next = _qk(q, k_base, start_n + BLOCK_N, Tk, STRIDE_KT, BLOCK_N, HEAD_DIM, MASKED,
                         DOT_PREC)
            acc, l_i, m_i = _softmax_pv(acc, l_i, m_i, s, start_n, v_base, ks_base, qpos, lo, Tk,
                                        qk_scale, STRIDE_KT, BLOCK_N, HEAD_DIM, HKV, MASKED, FP8,
                                        DOT_PREC)
            s = s_next
        acc, l_i, m_i = _softmax_pv(acc, l_i, m_i, s, start + (n - 1) * BLOCK_N, v_base, ks_base,
                                    qpos, lo, Tk, qk_scale, STRIDE_KT, BLOCK_N, HEAD_DIM, HKV,
                                    MASKED, FP8, DOT_PREC)
    return acc, l_i, m_i


@triton.jit
def _fwd_range(acc, l_i, m_i, q, k_base, v_base, ks_base, start, end, qpos, lo, Tk, qk_scale,
               STRIDE_KT: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
               HKV: tl.constexpr, MASKED: tl.constexpr, FP8: tl.constexpr,
               DOT_PREC: tl.constexpr, AHEAD: tl.constexpr):
    if AHEAD:
        return _fwd_inner_ahead(acc, l_i, m_i, q, k_base, v_base, ks_base, start, end, qpos, lo,
                                Tk, qk_scale, STRIDE_KT, BLOCK_N, HEAD_DIM, HKV, MASKED, FP8,
                                DOT_PREC)
    return _fwd_inner(acc, l_i, m_i, q, k_base, v_base, ks_base, start, end, qpos, lo, Tk,
                      qk_scale, STRIDE_KT, BLOCK_N, HEAD_DIM, HKV, MASKED, FP8, DOT_PREC)


@triton.jit
def _fwd_program(start_m, pid_bh, Q, K, V, O, LSE, SEG_START, QS, KS, qk_scale, q_offset,
                 window, Tq, Tk,
                 HQ: tl.constexpr, HKV: tl.constexpr, HEAD_DIM: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 HAS_SEG: tl.constexpr, HAS_WINDOW: tl.constexpr, FP8: tl.constexpr,
                 DOT_PREC: tl.constexpr, AHEAD: tl.constexpr):
    """O, lse of query rows start_m.. of (batch, query head) pid_bh."""
    b = pid_bh // HQ
    h = pid_bh % HQ
    hkv = h // (HQ // HKV)
    STRIDE_QT: tl.constexpr = HQ * HEAD_DIM
    STRIDE_KT: tl.constexpr = HKV * HEAD_DIM
    # 64-bit bases (row start_m of Q / O, row 0 of K / V: T·H·D may pass 2^31), 32-bit offsets
    # inside a tile (BLOCK·H·D)
    q_row0 = (b.to(tl.int64) * Tq + start_m) * STRIDE_QT + h * HEAD_DIM
    k_base = K + b.to(tl.int64) * Tk * STRIDE_KT + hkv * HEAD_DIM
    v_base = V + b.to(tl.int64) * Tk * STRIDE_KT + hkv * HEAD_DIM

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_tile = tl.arange(0, BLOCK_M)[:, None] * STRIDE_QT + offs_d[None, :]
    m_ok = offs_m < Tq
    qpos = q_offset + offs_m
    lo = row_lo(qpos, m_ok, SEG_START, window, HAS_SEG, HAS_WINDOW)
    q = tl.load(Q + q_row0 + q_tile, mask=m_ok[:, None], other=0.0)
    ks_base = KS + b.to(tl.int64) * Tk * HKV + hkv  # FP8 only: key scales [B, Tk, Hkv]
    if FP8:  # Q, K arrive as e4m3 with fp32 scales per (token, head): fold them into qk_scale
        qs = tl.load(QS + (b.to(tl.int64) * Tq + offs_m) * HQ + h, mask=m_ok, other=0.0)
        qk_scale = qs * qk_scale

    # key ranges (see common.py): [kv_lo, f_lo) masked, [f_lo, f_hi) unmasked, [f_hi, kv_hi) masked
    q_first = q_offset + start_m
    q_last = q_offset + tl.minimum(start_m + BLOCK_M, Tq) - 1
    lo_first = row_lo_scalar(q_first, SEG_START, window, HAS_SEG, HAS_WINDOW)
    lo_last = row_lo_scalar(q_last, SEG_START, window, HAS_SEG, HAS_WINDOW)
    kv_lo = (lo_first // BLOCK_N) * BLOCK_N
    kv_hi = tl.minimum(q_last + 1, Tk)
    f_lo = tl.maximum(tl.cdiv(lo_last, BLOCK_N) * BLOCK_N, kv_lo)
    f_hi = tl.minimum((q_first + 1) // BLOCK_N, Tk // BLOCK_N) * BLOCK_N
    if f_hi <= f_lo:  # no block is visible to every row: one masked range
        f_lo = kv_lo
        f_hi = kv_lo

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30  # finite: a fully masked block gives p=0
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    acc, l_i, m_i = _fwd_range(acc, l_i, m_i, q, k_base, v_base, ks_base, kv_lo, f_lo, qpos, lo,
                               Tk, qk_scale, STRIDE_KT, BLOCK_N, HEAD_DIM, HKV, True, FP8,
                               DOT_PREC, AHEAD)
    acc, l_i, m_i = _fwd_range(acc, l_i, m_i, q, k_base, v_base, ks_base, f_lo, f_hi, qpos, lo,
                               Tk, qk_scale, STRIDE_KT, BLOCK_N, HEAD_DIM, HKV, False, FP8,
                               DOT_PREC, AHEAD)
    acc, l_i, m_i = _fwd_range(acc, l_i, m_i, q, k_base, v_base, ks_base, f_hi, kv_hi, qpos, lo,
                               Tk, qk_scale, STRIDE_KT, BLOCK_N, HEAD_DIM, HKV, True, FP8,
                               DOT_PREC, AHEAD)

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)  # only padding rows (never stored) have l == 0
    acc = acc / l_safe[:, None]
    tl.store(O + q_row0 + q_tile, cvt(acc, O.dtype.element_ty), mask=m_ok[:, None])
    lse = (m_i + tl.math.log2(l_safe)) * LN2
    tl.store(LSE + pid_bh.to(tl.int64) * Tq + offs_m, lse, mask=m_ok)


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, SEG_START, QS, KS, qk_scale, q_offset, window, Tq, Tk, n_sm,
                HQ: tl.constexpr, HKV: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                HAS_SEG: tl.constexpr, HAS_WINDOW: tl.constexpr, FP8: tl.constexpr,
                DOT_PREC: tl.constexpr, AHEAD: tl.constexpr):
    # heaviest (latest) query blocks first, rows in groups (common.heavy_first): the causal
    # tail of the grid is made of short blocks
    rank, pid_bh = heavy_first(n_sm)
    _fwd_program((tl.num_programs(0) - 1 - rank) * BLOCK_M, pid_bh, Q, K, V, O, LSE, SEG_START,
                 QS, KS, qk_scale, q_offset, window, Tq, Tk, HQ, HKV, HEAD_DIM, BLOCK_M, BLOCK_N,
                 HAS_SEG, HAS_WINDOW, FP8, DOT_PREC, AHEAD)


# ---------------------------------------------------------------------------------------------
# launch

# (BLOCK_M, BLOCK_N, warps, stages) per head dim, first = the FLASH_AUTOTUNE=0 choice; lists and
# order from the sweeps in docs/flash_notes.md. All fit sm_90's 227 KB of shared memory and 255
# registers (ptxas, scripts/tune/tune_flash.py --aot; only (128, 128, 8, 3) at D=128 spills 4
# bytes).
# 64x64/4/3 stays out of the D = 128 list: a single noisy timing made the autotuner pick it.
FWD_CFGS = {
    64: [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3)],
    128: [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 4)],
    256: [(64, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 2)],
    512: [(64, 32, 4, 2), (32, 32, 4, 2)],  # fp32 at D = 256 (tests only: slow, spills)
}
INTERP_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 16}  # interpreter: small blocks, many block edges

_cfgs, _prune = common.tuned_configs(FWD_CFGS)
# AHEAD is part of the key: the scores-ahead loop has its own best config (and 128x128/8/3 does
# not fit its shared memory), so a shape tuned with it on must not lend its pick to it off
_fwd_tuned = triton.autotune(_cfgs, key=["Tq", "Tk", "HEAD_DIM", "HQ", "HKV", "HAS_SEG",
                                          "HAS_WINDOW", "FP8", "AHEAD"],
                             prune_configs_by={"early_config_prune": _prune})(_fwd_kernel)


def fwd_triton(q, k, v, scale, seg_start, q_offset, window, q_scale=None, k_scale=None):
    """Launch the forward kernel on checked arguments (see op.py); returns (o, lse).
    FP8: q, k in float8_e4m3fn with fp32 per-(token, head) scales q_scale [B, Tq, Hq],
    k_scale [B, Tk, Hkv] (q = q8 * q_scale); v and o in bf16/fp16."""
    B, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    fp8 = q_scale is not None
    o = alloc.empty(q.shape, v.dtype if fp8 else q.dtype, q.device)
    lse = alloc.empty((B, hq, tq), torch.float32, q.device)
    has_seg = seg_start is not None
    seg = seg_start if has_seg else lse  # dummy pointer, never read
    args = (q, k, v, o, lse, seg, q_scale if fp8 else lse, k_scale if fp8 else lse,
            scale * LOG2E_F, q_offset, window or 0, tq, tk, common.launch_sms(q.device))
    meta = dict(HQ=hq, HKV=hkv, HEAD_DIM=d, HAS_SEG=has_seg, HAS_WINDOW=window is not None,
                FP8=fp8, DOT_PREC=dot_precision(q.dtype),
                AHEAD=common.fwd_ahead(pick_dim(FWD_CFGS, d, v.dtype), fp8))
    if common.use_autotune("fwd"):
        grid = lambda m: (triton.cdiv(tq, m["BLOCK_M"]), B * hq)  # noqa: E731
        _fwd_tuned[grid](*args, **meta)
    else:
        if "fwd" in common.OVERRIDE:
            bm, bn, w, s = common.OVERRIDE["fwd"]
        elif INTERPRET:
            bm, bn, w, s = INTERP_BLOCKS["BLOCK_M"], INTERP_BLOCKS["BLOCK_N"], 4, 1
        else:
            bm, bn, w, s = FWD_CFGS[pick_dim(FWD_CFGS, d, v.dtype)][0]
        _fwd_kernel[(triton.cdiv(tq, bm), B * hq)](*args, **meta, BLOCK_M=bm, BLOCK_N=bn,
                                                    num_warps=w, num_stages=s)
    return o, lse
