"""Backward kernels: dK/dV (one program per key block and KV head, looping over the query heads
of its GQA group) and dQ (one program per query block and query head).

Deterministic: every output element is written by exactly one program, no atomics. The price is
that the score tile is recomputed in both kernels (7 block products instead of 5).

Memory plan
  preprocess : delta = rowsum(O * dO) fp32 [B, Hq, Tq] (attn/common/softmax.py)
  dK/dV      : registers K, V tiles [BLOCK_N, D] and fp32 accumulators dK, dV [BLOCK_N, D];
               streams Q, dO tiles [BLOCK_M, D] plus lse, delta [BLOCK_M] of each query head of
               the group; writes dK, dV once (KV dtype), so GQA costs no atomics and no copies
  dQ         : registers Q, dO tiles, fp32 accumulator dQ [BLOCK_M, D]; streams K, V tiles;
               writes dQ once
The math and the streaming loops are attn/common/softmax_bwd.py's (dkdv_heads, dq_ranges with
MASK_CAUSAL); this file decides which blocks each program visits, the launch order and configs.
Masking as in the forward (common.py); dK/dV walks query blocks with hi(s) per key.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

from attn.common import alloc
from attn.common.jit import LOG2E, LOG2E_F, cvt
from attn.common.launch import dot_precision, pick_dim, use_tma
from attn.common.softmax import bwd_delta, row_lo
from attn.common.softmax_bwd import MASK_CAUSAL, dkdv_heads, dq_ranges
from attn.dispatch import INTERPRET
from attn.flash import common
from attn.flash.common import heavy_first, key_hi, row_lo_scalar


@triton.jit
def _dkdv_program(start_n, pid_bh, Q, K, V, DO, LSE, DELTA, DK, DV, SEG_START, SEG_END, scale,
                  qk_scale, q_offset, window, Tq, Tk,
                  HQ: tl.constexpr, HKV: tl.constexpr, HEAD_DIM: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  HAS_SEG: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_PREC: tl.constexpr,
                  TMA: tl.constexpr):
    """dK, dV of keys start_n.. of (batch, KV head) pid_bh."""
    b = pid_bh // HKV
    hkv = pid_bh % HKV
    STRIDE_KT: tl.constexpr = HKV * HEAD_DIM
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    n_ok = offs_n < Tk
    # int64 base of the key tile (Tk·Hkv·D may pass 2^31), int32 offsets inside it
    kv_off = (b.to(tl.int64) * Tk + start_n) * STRIDE_KT + hkv * HEAD_DIM \
        + (tl.arange(0, BLOCK_N)[:, None] * STRIDE_KT + offs_d[None, :])
    k = tl.load(K + kv_off, mask=n_ok[:, None], other=0.0)
    v = tl.load(V + kv_off, mask=n_ok[:, None], other=0.0)

    # query-row ranges (row index i = position - q_offset): [m_lo, f_lo) masked,
    # [f_lo, f_hi) unmasked (every pair visible), [f_hi, m_hi) masked
    k_last = tl.minimum(start_n + BLOCK_N, Tk) - 1
    BIG = Tq + q_offset  # past every query position
    hi_first = key_hi(start_n, SEG_END, window, BIG, HAS_SEG, HAS_WINDOW)
    hi_last = key_hi(k_last, SEG_END, window, BIG, HAS_SEG, HAS_WINDOW)
    m_lo = (tl.maximum(start_n - q_offset, 0) // BLOCK_M) * BLOCK_M
    m_hi = tl.minimum(hi_last - q_offset + 1, Tq)
    f_lo = tl.maximum(tl.cdiv(tl.maximum(k_last - q_offset, 0), BLOCK_M) * BLOCK_M, m_lo)
    f_hi = (tl.minimum(hi_first - q_offset + 1, Tq) // BLOCK_M) * BLOCK_M
    if f_hi <= f_lo:
        f_lo = m_lo
        f_hi = m_lo

    # MASK_CAUSAL takes the key positions as key_lo (key_hi unused)
    dk, dv = dkdv_heads(k, v, Q, DO, LSE, DELTA, b, hkv, m_lo, f_lo, f_hi, m_hi, offs_n, offs_n,
                        SEG_START, window, q_offset, Tq, qk_scale, HQ, HKV, HEAD_DIM, BLOCK_M,
                        BLOCK_N, MASK_CAUSAL, HAS_SEG, HAS_WINDOW, 0.0, False, DOT_PREC, TMA)
    tl.store(DK + kv_off, cvt(dk * scale, DK.dtype.element_ty), mask=n_ok[:, None])
    tl.store(DV + kv_off, cvt(dv, DV.dtype.element_ty), mask=n_ok[:, None])


@triton.jit
def _dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, SEG_START, SEG_END, scale, qk_scale,
                 q_offset, window, Tq, Tk, n_sm,
                 HQ: tl.constexpr, HKV: tl.constexpr, HEAD_DIM: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 HAS_SEG: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_PREC: tl.constexpr,
                 TMA: tl.constexpr):
    # key block 0 sees every query: rank 0 is the heaviest (common.heavy_first)
    rank, pid_bh = heavy_first(n_sm)
    _dkdv_program(rank * BLOCK_N, pid_bh, Q, K, V, DO, LSE, DELTA, DK, DV,
                  SEG_START, SEG_END, scale, qk_scale, q_offset, window, Tq, Tk, HQ, HKV,
                  HEAD_DIM, BLOCK_M, BLOCK_N, HAS_SEG, HAS_WINDOW, DOT_PREC, TMA)


@triton.jit
def _dq_program(start_m, pid_bh, Q, K, V, DO, LSE, DELTA, DQ, SEG_START, scale, qk_scale,
                q_offset, window, Tq, Tk,
                HQ: tl.constexpr, HKV: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                HAS_SEG: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_PREC: tl.constexpr,
                TMA: tl.constexpr, ACC: tl.constexpr):
    """dQ of query rows start_m.. of (batch, query head) pid_bh; ACC: added to what DQ holds
    (a caller summing several attention branches' dQ, attn/nsa/op.py)."""
    b = pid_bh // HQ
    h = pid_bh % HQ
    hkv = h // (HQ // HKV)
    STRIDE_QT: tl.constexpr = HQ * HEAD_DIM
    STRIDE_KT: tl.constexpr = HKV * HEAD_DIM
    k_base = K + b.to(tl.int64) * Tk * STRIDE_KT + hkv * HEAD_DIM
    v_base = V + b.to(tl.int64) * Tk * STRIDE_KT + hkv * HEAD_DIM
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_ok = offs_m < Tq
    # int64 base of the query tile (Tq·Hq·D may pass 2^31), int32 offsets inside it
    q_off = (b.to(tl.int64) * Tq + start_m) * STRIDE_QT + h * HEAD_DIM \
        + (tl.arange(0, BLOCK_M)[:, None] * STRIDE_QT + offs_d[None, :])
    q = tl.load(Q + q_off, mask=m_ok[:, None], other=0.0)
    do = tl.load(DO + q_off, mask=m_ok[:, None], other=0.0)
    lse2 = tl.load(LSE + pid_bh.to(tl.int64) * Tq + offs_m, mask=m_ok, other=0.0) * LOG2E
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * Tq + offs_m, mask=m_ok, other=0.0)
    qpos = q_offset + offs_m
    lo = row_lo(qpos, m_ok, SEG_START, window, HAS_SEG, HAS_WINDOW)

    q_first = q_offset + start_m
    q_last = q_offset + tl.minimum(start_m + BLOCK_M, Tq) - 1
    lo_first = row_lo_scalar(q_first, SEG_START, window, HAS_SEG, HAS_WINDOW)
    lo_last = row_lo_scalar(q_last, SEG_START, window, HAS_SEG, HAS_WINDOW)
    kv_lo = (lo_first // BLOCK_N) * BLOCK_N
    kv_hi = tl.minimum(q_last + 1, Tk)
    f_lo = tl.maximum(tl.cdiv(lo_last, BLOCK_N) * BLOCK_N, kv_lo)
    f_hi = tl.minimum((q_first + 1) // BLOCK_N, Tk // BLOCK_N) * BLOCK_N
    if f_hi <= f_lo:
        f_lo = kv_lo
        f_hi = kv_lo

    # MASK_CAUSAL: lo = row_lo of each row (hi unused); no exact delta (P·K, rowsum(P·dP))
    dq, _, _ = dq_ranges(q, do, lse2, delta, K, V, k_base, v_base, b, hkv, kv_lo, f_lo, f_hi,
                         kv_hi, qpos, lo, lo, Tk, qk_scale, HKV, HEAD_DIM, BLOCK_M, BLOCK_N,
                         MASK_CAUSAL, False, DOT_PREC, TMA)
    dq = dq * scale
    if ACC:
        dq += tl.load(DQ + q_off, mask=m_ok[:, None], other=0.0).to(tl.float32)
    tl.store(DQ + q_off, cvt(dq, DQ.dtype.element_ty), mask=m_ok[:, None])


@triton.jit
def _dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, SEG_START, scale, qk_scale, q_offset, window, Tq, Tk,
               n_sm,
               HQ: tl.constexpr, HKV: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               HAS_SEG: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_PREC: tl.constexpr,
               TMA: tl.constexpr, ACC: tl.constexpr):
    rank, pid_bh = heavy_first(n_sm)  # the last query block is the heaviest: rank 0
    start_m = (tl.num_programs(0) - 1 - rank) * BLOCK_M
    _dq_program(start_m, pid_bh, Q, K, V, DO, LSE, DELTA, DQ, SEG_START, scale,
                qk_scale, q_offset, window, Tq, Tk, HQ, HKV, HEAD_DIM, BLOCK_M, BLOCK_N, HAS_SEG,
                HAS_WINDOW, DOT_PREC, TMA, ACC)


@triton.jit
def _bwd_fused_kernel(Q, K, V, DO, LSE, DELTA, DQ, DK, DV, SEG_START, SEG_END, scale, qk_scale,
                      q_offset, window, Tq, Tk,
                      HQ: tl.constexpr, HKV: tl.constexpr, HEAD_DIM: tl.constexpr,
                      BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr,
                      BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr,
                      HAS_SEG: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_PREC: tl.constexpr):
    """Both backward kernels in one launch (grid x: key blocks, then query blocks; y: B*Hq):
    dQ programs fill the SMs while the dK/dV launch would drain, one launch tail instead of two.
    Still deterministic: each output element has exactly one writer."""
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    n_kv = tl.cdiv(Tk, BLOCK_N1)
    if pid < n_kv:
        if pid_bh < tl.num_programs(1) // (HQ // HKV):  # rows B*Hkv.. of the grid: no dK/dV work
            _dkdv_program(pid * BLOCK_N1, pid_bh, Q, K, V, DO, LSE, DELTA, DK, DV, SEG_START,
                          SEG_END, scale, qk_scale, q_offset, window, Tq, Tk, HQ, HKV, HEAD_DIM,
                          BLOCK_M1, BLOCK_N1, HAS_SEG, HAS_WINDOW, DOT_PREC, False)
    else:
        n_q = tl.cdiv(Tq, BLOCK_M2)
        _dq_program((n_q - 1 - (pid - n_kv)) * BLOCK_M2, pid_bh, Q, K, V, DO, LSE, DELTA, DQ,
                    SEG_START, scale, qk_scale, q_offset, window, Tq, Tk, HQ, HKV, HEAD_DIM,
                    BLOCK_M2, BLOCK_N2, HAS_SEG, HAS_WINDOW, DOT_PREC, False, False)


# ---------------------------------------------------------------------------------------------
# launch

# (BLOCK_M, BLOCK_N, warps, stages) per head dim, first = FLASH_AUTOTUNE=0 choice; lists and
# order from the sweeps in docs/flash_notes.md; checked with ptxas for sm_90
# (scripts/tune/tune_flash.py --aot). At D=128 the fastest dK/dV config, (64, 128, 8, 2),
# spills 116 bytes (K, V, dK, dV tiles of 128 keys live all along) and still beats the
# spill-free ones; at D = 256 every dK/dV config that fits shared memory spills a few dozen bytes.
# dK/dV: key block resident (BLOCK_N), query blocks streamed (BLOCK_M)
DKDV_CFGS = {
    64: [(32, 64, 4, 3), (16, 128, 8, 3), (32, 128, 8, 3), (64, 64, 8, 3)],
    128: [(64, 128, 8, 3), (64, 128, 8, 2), (32, 128, 8, 3), (32, 64, 4, 3)],
    256: [(32, 64, 8, 2), (16, 64, 8, 2), (32, 32, 4, 2)],
    512: [(16, 32, 4, 2), (16, 16, 4, 2)],  # fp32 at D = 256 (tests only: slow, spills)
}
# dQ: query block resident (BLOCK_M), key blocks streamed (BLOCK_N)
DQ_CFGS = {
    64: [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (128, 128, 8, 3)],
    128: [(128, 64, 8, 3), (128, 128, 8, 2), (64, 32, 4, 3), (64, 64, 4, 3)],
    256: [(128, 32, 8, 2), (64, 32, 4, 2), (64, 64, 8, 2)],
    512: [(32, 32, 4, 2), (32, 16, 4, 2)],  # fp32 at D = 256 (tests only: slow, spills)
}
INTERP_DKDV = {"BLOCK_M": 16, "BLOCK_N": 32}
INTERP_DQ = {"BLOCK_M": 32, "BLOCK_N": 16}

# one launch for both (FLASH_BWD=fused): (BLOCK_M1, BLOCK_N1, BLOCK_M2, BLOCK_N2, warps, stages),
# the dK/dV blocks (1) and the dQ blocks (2) share warps and stages
FUSED_CFGS = {
    64: [(32, 128, 128, 64, 8, 3), (64, 64, 128, 64, 8, 3)],
    128: [(64, 128, 128, 64, 8, 3), (64, 128, 128, 64, 8, 2), (32, 128, 128, 64, 8, 3)],
    256: [(32, 64, 128, 32, 8, 2)],
    512: [(16, 32, 32, 32, 4, 2)],
}
INTERP_FUSED = (16, 32, 32, 16)
BWD_MODE = "split"  # default of FLASH_BWD (split | fused)

_KEY = ["Tq", "Tk", "HEAD_DIM", "HQ", "HKV", "HAS_SEG", "HAS_WINDOW"]
_c, _p = common.tuned_configs(DKDV_CFGS)
_dkdv_tuned = triton.autotune(_c, key=_KEY + ["TMA"],
                              prune_configs_by={"early_config_prune": _p})(_dkdv_kernel)
_c, _p = common.tuned_configs(DQ_CFGS)
# restore_value: the tuning runs launch several configs on the same DQ, which ACC adds to
_dq_tuned = triton.autotune(_c, key=_KEY + ["TMA"], restore_value=["DQ"],
                            prune_configs_by={"early_config_prune": _p})(_dq_kernel)


def _fused_configs():
    rows = sorted({r for v in FUSED_CFGS.values() for r in v})
    cfgs = [triton.Config(dict(BLOCK_M1=a, BLOCK_N1=b, BLOCK_M2=c, BLOCK_N2=d), num_warps=w,
                          num_stages=s) for a, b, c, d, w, s in rows]

    def prune(configs, named_args, **kwargs):
        keep = set(FUSED_CFGS[pick_dim(FUSED_CFGS, kwargs["HEAD_DIM"],
                                              named_args["Q"].dtype)])
        return [c for c in configs if (c.kwargs["BLOCK_M1"], c.kwargs["BLOCK_N1"],
                                       c.kwargs["BLOCK_M2"], c.kwargs["BLOCK_N2"], c.num_warps,
                                       c.num_stages) in keep]
    return cfgs, prune


_c, _p = _fused_configs()
_fused_tuned = triton.autotune(_c, key=_KEY, prune_configs_by={"early_config_prune": _p})(
    _bwd_fused_kernel)


def _fused_grid(tq, tk, bh):
    return lambda m: (triton.cdiv(tk, m["BLOCK_N1"]) + triton.cdiv(tq, m["BLOCK_M2"]), bh)


def _launch(kind, tuned, plain, fixed, interp, n_rows, n_progs, args, meta, blk):
    if common.use_autotune(kind):
        tuned[lambda m: (triton.cdiv(n_rows, m[blk]), n_progs)](*args, **meta)
        return
    if kind in common.OVERRIDE:
        bm, bn, w, s = common.OVERRIDE[kind]
    elif INTERPRET:
        bm, bn, w, s = interp["BLOCK_M"], interp["BLOCK_N"], 4, 1
    else:
        bm, bn, w, s = fixed[pick_dim(fixed, meta["HEAD_DIM"], args[0].dtype)][0]
    n_blk = bm if blk == "BLOCK_M" else bn
    plain[(triton.cdiv(n_rows, n_blk), n_progs)](*args, **meta, BLOCK_M=bm, BLOCK_N=bn,
                                                 num_warps=w, num_stages=s)


def _dkdv_gluon(q, k) -> bool:
    """Whether the split backward's dK/dV runs bwd_gluon.py's kernel (FLASH_DKDV_IMPL, see
    common.py); ValueError when it is demanded outside its scope."""
    def scope():
        from attn.flash.bwd_gluon import dkdv_scope_error
        return dkdv_scope_error(q, k)
    return common.gluon_chosen("FLASH_DKDV_IMPL", common.DKDV_IMPL, q, "Gluon dK/dV kernel",
                               scope)


def bwd_triton(do, q, k, v, o, lse, scale, seg, q_offset, window, delta=None, dq_acc=None):
    """Launch the backward kernels on checked arguments (see op.py); returns (dq, dk, dv).
    delta: rowsum(o·do) fp32 [B, Hq, Tq] when the caller has it; dq_acc: a tensor like q that
    this dQ is added to (and returned as dq)."""
    B, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    if delta is None:
        delta = bwd_delta(o, do)
    dq = alloc.empty(q.shape, q.dtype, q.device) if dq_acc is None else dq_acc
    mode = os.environ.get("FLASH_BWD", BWD_MODE)
    if mode not in ("split", "fused"):
        raise ValueError(f"FLASH_BWD={mode!r}: must be 'split' or 'fused'")
    gluon = mode == "split" and _dkdv_gluon(q, k)
    if not gluon:   # else dkdv_gluon allocates them
        dk = alloc.empty(k.shape, k.dtype, k.device)
        dv = alloc.empty(v.shape, v.dtype, v.device)
    has_seg = seg is not None
    seg_start, seg_end = seg if has_seg else (delta, delta)  # dummies, never read
    meta = dict(HQ=hq, HKV=hkv, HEAD_DIM=d, HAS_SEG=has_seg, HAS_WINDOW=window is not None,
                DOT_PREC=dot_precision(q.dtype))
    w = window or 0
    if mode == "fused":
        # the fused kernel's dQ programs overwrite: with dq_acc, a separate sum afterwards
        dq_f = dq if dq_acc is None else alloc.empty(q.shape, q.dtype, q.device)
        args = (q, k, v, do, lse, delta, dq_f, dk, dv, seg_start, seg_end, scale,
                scale * LOG2E_F, q_offset, w, tq, tk)
        if common.use_autotune("fused"):
            _fused_tuned[_fused_grid(tq, tk, B * hq)](*args, **meta)
        else:
            if "fused" in common.OVERRIDE:
                m1, n1, m2, n2, nw, ns = common.OVERRIDE["fused"]
            elif INTERPRET:
                (m1, n1, m2, n2), nw, ns = INTERP_FUSED, 4, 1
            else:
                m1, n1, m2, n2, nw, ns = FUSED_CFGS[pick_dim(FUSED_CFGS, d, q.dtype)][0]
            blocks = dict(BLOCK_M1=m1, BLOCK_N1=n1, BLOCK_M2=m2, BLOCK_N2=n2)
            _bwd_fused_kernel[_fused_grid(tq, tk, B * hq)(blocks)](
                *args, **meta, **blocks, num_warps=nw, num_stages=ns)
        if dq_acc is not None:
            dq_acc.add_(dq_f)
        return dq, dk, dv
    if gluon:
        from attn.flash.bwd_gluon import dkdv_gluon
        dk, dv = dkdv_gluon(do, q, k, v, lse, delta, scale, seg[1] if has_seg else None,
                            q_offset, window)
    else:
        _launch("dkdv", _dkdv_tuned, _dkdv_kernel, DKDV_CFGS, INTERP_DKDV, tk, B * hkv,
                (q, k, v, do, lse, delta, dk, dv, seg_start, seg_end, scale, scale * LOG2E_F,
                 q_offset, w, tq, tk, common.launch_sms(q.device)),
                dict(meta, TMA=use_tma("dkdv", q, do)), "BLOCK_N")
    _launch("dq", _dq_tuned, _dq_kernel, DQ_CFGS, INTERP_DQ, tq, B * hq,
            (q, k, v, do, lse, delta, dq, seg_start, scale, scale * LOG2E_F, q_offset, w, tq, tk,
             common.launch_sms(q.device)),
            dict(meta, TMA=use_tma("dq", k, v), ACC=dq_acc is not None), "BLOCK_M")
    return dq, dk, dv
