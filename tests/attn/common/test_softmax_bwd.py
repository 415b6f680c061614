"""The shared softmax backward (attn/common/softmax_bwd.py) on its own, in the Triton interpreter:
tiny kernels call the per-tile functions (dkdv_probs + dkdv_acc, dq_probs + dq_acc) and the
shared loops (dkdv_heads, dq_ranges) for every mask kind, against torch autograd of a float64
masked softmax attention with the same visibility. The families' own tests (tests/attn/flash,
moba, nsa) cover the same code inside their kernels, with their routing and bounds.

Inputs fp32 with ieee dots: relative error (norm) <= 1e-5. Rows that see no key carry
lse = +inf (P = 0) and must get dQ = 0.
"""
from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl

from attn.common.jit import LOG2E
from attn.common.softmax import row_lo
from attn.common.softmax_bwd import (MASK_BOUNDS, MASK_CAUSAL, MASK_NONE, dkdv_acc, dkdv_heads,
                                     dkdv_probs, dq_acc, dq_probs, dq_ranges)

KINDS = {"none": MASK_NONE.value, "causal": MASK_CAUSAL.value, "bounds": MASK_BOUNDS.value}
BIG = tl.constexpr(2 ** 30)  # past every position (the kernels' sentinel)


def rel(a, b):
    """||a - b|| / ||b||, the denominator floored at an rms of 1e-3 (rows of exact zeros)."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-3 * max(b.numel(), 1) ** 0.5)).item()


def reference(q, k, v, do, vis, scale):
    """float64 autograd of softmax attention where vis [.., Tq, Tk] says which pairs count:
    (dq, dk, dv, lse with +inf on rows that see nothing, delta = rowsum(o·do))."""
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    s = torch.where(vis, q @ k.transpose(-1, -2) * scale, float("-inf"))
    empty = ~vis.any(-1, keepdim=True)
    p = torch.where(empty, 0.0, torch.softmax(torch.where(empty, 0.0, s), -1))
    o = p @ v
    o.backward(do.double())
    lse = torch.where(empty[..., 0], float("inf"), torch.logsumexp(s, -1))
    delta = (o.detach() * do.double()).sum(-1)
    return q.grad, k.grad, v.grad, lse.float(), delta.float()


def causal_vis(tq, tk, q_offset, seg_start, window):
    """Flash's rule: query position p sees key s iff row_lo(p) <= s <= p."""
    p = torch.arange(q_offset, q_offset + tq)[:, None]
    s = torch.arange(tk)[None, :]
    lo = torch.zeros_like(p)
    if window is not None:
        lo = torch.maximum(lo, p - window + 1)
    if seg_start is not None:
        lo = torch.maximum(lo, seg_start.long()[p])
    return (s <= p) & (s >= lo)


@triton.jit
def _tile_kernel(Q, K, V, DO, LSE, DELTA, KEY_LO, KEY_HI, ROW_LO, ROW_HI, SEG_START, DQ, DK, DV,
                 q_offset, window, Tq, Tk, scale, qk_scale,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                 MASK: tl.constexpr, HAS_SEG: tl.constexpr, HAS_WINDOW: tl.constexpr,
                 MASK_FIRST: tl.constexpr):
    """One query tile against one key tile: dK, dV through dkdv_probs / dkdv_acc, dQ through
    dq_probs / dq_acc."""
    rows = tl.arange(0, BLOCK_M)
    keys = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    r_ok = rows < Tq
    n_ok = keys < Tk
    q_off = rows[:, None] * HEAD_DIM + offs_d[None, :]
    k_off = keys[:, None] * HEAD_DIM + offs_d[None, :]
    q = tl.load(Q + q_off, mask=r_ok[:, None], other=0.0)
    do = tl.load(DO + q_off, mask=r_ok[:, None], other=0.0)
    k = tl.load(K + k_off, mask=n_ok[:, None], other=0.0)
    v = tl.load(V + k_off, mask=n_ok[:, None], other=0.0)
    lse2 = tl.load(LSE + rows, mask=r_ok, other=float("inf")) * LOG2E
    delta = tl.load(DELTA + rows, mask=r_ok, other=0.0)
    if MASK == MASK_BOUNDS:
        key_lo = tl.load(KEY_LO + keys, mask=n_ok, other=BIG)
        key_hi = tl.load(KEY_HI + keys, mask=n_ok, other=-1)
        lo = tl.load(ROW_LO + rows, mask=r_ok, other=0)
        hi = tl.load(ROW_HI + rows, mask=r_ok, other=0)
    else:
        key_lo = keys
        key_hi = keys
        lo = row_lo(q_offset + rows, r_ok, SEG_START, window, HAS_SEG, HAS_WINDOW)
        hi = lo

    p_t = dkdv_probs(k, q, lse2, rows, r_ok, q_offset, key_lo, key_hi, SEG_START, window,
                     qk_scale, MASK, HAS_SEG, HAS_WINDOW, "ieee", MASK_FIRST)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dk, dv = dkdv_acc(dk, dv, p_t, q, do, v, delta, "ieee")
    tl.store(DK + k_off, dk * scale, mask=n_ok[:, None])
    tl.store(DV + k_off, dv, mask=n_ok[:, None])

    p = dq_probs(q, k, lse2, keys, q_offset + rows, lo, hi, Tk, qk_scale, MASK, "ieee")
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    dq, _ = dq_acc(dq, p, k, v, do, delta, "ieee")
    tl.store(DQ + q_off, dq * scale, mask=r_ok[:, None])


def bounds_vis(tq, tk, q_offset):
    """A visibility with per-key query bounds [key_lo, key_hi] (both non-decreasing, so every
    row's keys are one range [row_lo, row_hi)), some rows and keys seeing nothing."""
    pos = q_offset + tq
    # the first row sees nothing, the last keys are seen by no row
    key_lo = torch.sort(torch.randint(q_offset + 1, pos + 3, (tk,))).values
    key_hi = key_lo + torch.sort(torch.randint(0, 8, (tk,))).values
    p = torch.arange(q_offset, pos)[:, None]
    vis = (p >= key_lo[None, :]) & (p <= key_hi[None, :])
    s = torch.arange(tk)[None, :]
    row_lo_ = torch.where(vis, s, tk).min(-1).values
    row_hi = torch.where(vis, s + 1, 0).max(-1).values
    row_lo_ = torch.minimum(row_lo_, row_hi)  # empty rows: [hi, hi)
    i32 = lambda t: t.to(torch.int32).contiguous()  # noqa: E731
    return vis, i32(key_lo), i32(key_hi), i32(row_lo_), i32(row_hi)


@pytest.mark.parametrize("kind,seg,window,mask_first", [
    ("none", False, None, False), ("causal", False, None, False), ("causal", True, None, False),
    ("causal", False, 5, False), ("causal", True, 7, False), ("causal", True, 7, True),
    ("bounds", False, None, False), ("bounds", False, None, True)])
def test_tile(kind, seg, window, mask_first):
    bm, bn, d = 16, 32, 16
    # padding rows and keys inside the tiles, except MASK_NONE (its callers never mask)
    tq, tk, q_offset = (bm, bn, 0) if kind == "none" else (13, 29, 9)
    q, do = torch.randn(tq, d), torch.randn(tq, d)
    k, v = torch.randn(tk, d), torch.randn(tk, d)
    scale = d ** -0.5
    seg_start = None
    key_lo = key_hi = row_lo_ = row_hi = torch.zeros(1, dtype=torch.int32)
    if kind == "bounds":
        vis, key_lo, key_hi, row_lo_, row_hi = bounds_vis(tq, tk, q_offset)
        assert (~vis.any(-1)).any() and vis.any()
    elif kind == "causal":
        if seg:  # documents starting at 0, 4, 11, 20 (position -> its document's start)
            cu = torch.tensor([0, 4, 11, 20, q_offset + tq])
            seg_start = cu[torch.searchsorted(cu, torch.arange(q_offset + tq), right=True) - 1]
            seg_start = seg_start.to(torch.int32)
        vis = causal_vis(tq, tk, q_offset, seg_start, window)
    else:
        vis = torch.ones(tq, tk, dtype=torch.bool)
    dq_x, dk_x, dv_x, lse, delta = reference(q, k, v, do, vis, scale)
    dq, dk, dv = (torch.full_like(t, float("nan")) for t in (q, k, v))
    _tile_kernel[(1,)](q, k, v, do, lse, delta, key_lo, key_hi, row_lo_, row_hi,
                       seg_start if seg else key_lo, dq, dk, dv, q_offset, window or 0, tq, tk,
                       scale, scale * math.log2(math.e), BLOCK_M=bm, BLOCK_N=bn, HEAD_DIM=d,
                       MASK=KINDS[kind], HAS_SEG=seg, HAS_WINDOW=window is not None,
                       MASK_FIRST=mask_first)
    for name, got, want in (("dq", dq, dq_x), ("dk", dk, dk_x), ("dv", dv, dv_x)):
        assert rel(got, want) <= 1e-5, (name, rel(got, want))
    assert (dq[~vis.any(-1)] == 0).all()


@triton.jit
def _loops_kernel(Q, K, V, DO, LSE, DELTA, KEY_LO, KEY_HI, ROW_LO, ROW_HI, DQ, DK, DV, PK, DSUM,
                  Tq, Tk, f_lo, f_hi, qk_scale, HQ: tl.constexpr, HKV: tl.constexpr,
                  HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  KEYS: tl.constexpr, LSE_PAD: tl.constexpr, JUST_IN_TIME: tl.constexpr,
                  TMA: tl.constexpr):
    """MASK_BOUNDS, batch program_id(1) = 0. Programs (pid < HKV, 0, 0): dK, dV of all keys (one
    tile of KEYS) of KV head pid through dkdv_heads, rows [0, f_lo) and [f_hi, Tq) masked,
    [f_lo, f_hi) not; programs (HKV + h, 0, m): dQ, P·K, rowsum(P·dP) of query tile m of query
    head h through dq_ranges (every key range masked)."""
    pid = tl.program_id(0)
    b = tl.program_id(1)
    m = tl.program_id(2)
    offs_d = tl.arange(0, HEAD_DIM)
    if pid < HKV:
        if m == 0:
            keys = tl.arange(0, KEYS)
            n_ok = keys < Tk
            kv_off = keys[:, None] * (HKV * HEAD_DIM) + pid * HEAD_DIM + offs_d[None, :]
            k = tl.load(K + kv_off, mask=n_ok[:, None], other=0.0)
            v = tl.load(V + kv_off, mask=n_ok[:, None], other=0.0)
            key_lo = tl.load(KEY_LO + keys, mask=n_ok, other=BIG)
            key_hi = tl.load(KEY_HI + keys, mask=n_ok, other=-1)
            dk, dv = dkdv_heads(k, v, Q, DO, LSE, DELTA, b, pid, 0, f_lo, f_hi, Tq, key_lo,
                                key_hi, KEY_LO, 0, 0, Tq, qk_scale, HQ, HKV, HEAD_DIM, BLOCK_M,
                                KEYS, MASK_BOUNDS, False, False, LSE_PAD, JUST_IN_TIME, "ieee",
                                TMA)
            tl.store(DK + kv_off, dk, mask=n_ok[:, None])
            tl.store(DV + kv_off, dv, mask=n_ok[:, None])
    else:
        h = pid - HKV
        hkv = h // (HQ // HKV)
        rows = m * BLOCK_M + tl.arange(0, BLOCK_M)
        r_ok = rows < Tq
        q_off = rows[:, None] * (HQ * HEAD_DIM) + h * HEAD_DIM + offs_d[None, :]
        q = tl.load(Q + q_off, mask=r_ok[:, None], other=0.0)
        do = tl.load(DO + q_off, mask=r_ok[:, None], other=0.0)
        lse2 = tl.load(LSE + h * Tq + rows, mask=r_ok, other=float("inf")) * LOG2E
        delta = tl.load(DELTA + h * Tq + rows, mask=r_ok, other=0.0)
        lo = tl.load(ROW_LO + rows, mask=r_ok, other=0)
        hi = tl.load(ROW_HI + rows, mask=r_ok, other=0)
        dq, pk, dsum = dq_ranges(q, do, lse2, delta, K, V, K + hkv * HEAD_DIM,
                                 V + hkv * HEAD_DIM, b, hkv, 0, 0, 0, Tk, rows, lo, hi, Tk,
                                 qk_scale, HKV, HEAD_DIM, BLOCK_M, BLOCK_N, MASK_BOUNDS, True,
                                 "ieee", TMA)
        tl.store(DQ + q_off, dq, mask=r_ok[:, None])
        tl.store(PK + q_off, pk, mask=r_ok[:, None])
        tl.store(DSUM + h * Tq + rows, dsum, mask=r_ok)


@pytest.mark.parametrize("tma", [False, True])
@pytest.mark.parametrize("lse_pad,just_in_time", [(0.0, False), (float("inf"), True)])
def test_loops(tma, lse_pad, just_in_time):
    """GQA group of 2, rows and keys streamed in several tiles (ragged last tile), a middle
    row range every key sees (unmasked), TMA descriptors and pointer loads, both statement
    orders of dkdv_rows."""
    from attn.common.launch import use_tma

    hq, hkv, d, tq, tk, bm, bn, keys = 4, 2, 16, 45, 37, 16, 16, 64
    q, do = torch.randn(tq, hq, d), torch.randn(tq, hq, d)
    k, v = torch.randn(tk, hkv, d), torch.randn(tk, hkv, d)
    scale = d ** -0.5
    vis, key_lo, key_hi, row_lo_, row_hi = bounds_vis(tq, tk, 0)
    # rows [16, 32) see every key: key bounds widened to cover them
    key_lo = torch.minimum(key_lo, torch.tensor(16, dtype=torch.int32))
    key_hi = torch.maximum(key_hi, torch.tensor(31, dtype=torch.int32))
    p = torch.arange(tq)[:, None]
    vis = (p >= key_lo[None, :]) & (p <= key_hi[None, :])
    s = torch.arange(tk)[None, :]
    row_hi = torch.where(vis, s + 1, 0).max(-1).values.to(torch.int32)
    row_lo_ = torch.minimum(torch.where(vis, s, tk).min(-1).values, row_hi).to(torch.int32)
    g = hq // hkv
    kx, vx = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    dq_x, dk_x, dv_x, lse, delta = reference(q.transpose(0, 1), kx.transpose(0, 1),
                                             vx.transpose(0, 1), do.transpose(0, 1), vis, scale)
    dk_x = dk_x.view(hkv, g, tk, d).sum(1).transpose(0, 1) / scale
    dv_x = dv_x.view(hkv, g, tk, d).sum(1).transpose(0, 1)
    dq_x = dq_x.transpose(0, 1) / scale
    pv = torch.where(vis, torch.softmax(torch.where(vis, q.transpose(0, 1).double()
                                                    @ kx.permute(1, 2, 0).double() * scale,
                                                    float("-inf")), -1), 0.0).nan_to_num()
    pk_x = (pv @ kx.transpose(0, 1).double()).transpose(0, 1)
    dsum_x = delta  # rowsum(P·dP) = rowsum(O·dO)
    dq, dk, dv, pk = (torch.full(t.shape, float("nan")) for t in (q, k, v, q))
    dsum = torch.full((hq, tq), float("nan"))
    if tma and not use_tma("dkdv", q):  # (sets the descriptors' scratch allocator)
        pytest.skip("TMA descriptors turned off (FLASH_TMA=0)")
    _loops_kernel[(hkv + hq, 1, triton.cdiv(tq, bm))](
        q, k, v, do, lse.contiguous(), delta.contiguous(), key_lo, key_hi, row_lo_, row_hi, dq, dk,
        dv, pk, dsum, tq, tk, 16, 32, scale * math.log2(math.e), HQ=hq, HKV=hkv, HEAD_DIM=d,
        BLOCK_M=bm, BLOCK_N=bn, KEYS=keys, LSE_PAD=lse_pad, JUST_IN_TIME=just_in_time, TMA=tma)
    for name, got, want in (("dq", dq, dq_x), ("dk", dk, dk_x), ("dv", dv, dv_x),
                            ("pk", pk, pk_x), ("dsum", dsum, dsum_x)):
        assert rel(got, want) <= 1e-5, (name, rel(got, want))
