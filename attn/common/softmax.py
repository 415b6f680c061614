"""Softmax-attention pieces shared by flash, MoBA and NSA's branches: the online-softmax step of
a forward loop, the causal / document / window rule's lower key bound, and the backward's
preprocess delta = rowsum(O·dO) (the backward itself: softmax_bwd.py).

Memory plan of the preprocess: one program per BLOCK_M rows of one (batch, query head); reads O
and dO once ([BLOCK_M, D] each, upcast to fp32), writes delta fp32 [B, Hq, Tq] once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from attn.common import alloc
from attn.common.jit import cvt, mma
from attn.dispatch import INTERPRET


@triton.jit
def softmax_step(s, v, acc, m_i, l_i, DOT_PREC: tl.constexpr):
    """One online-softmax step over a key chunk: log2-domain scores s [M, N] (−inf where masked;
    m_i starts finite, so a fully masked chunk adds exactly 0), values v [N, D]. Returns the
    updated (acc, m_i, l_i): acc the unnormalised fp32 output, m_i the running max, l_i the
    running sum of exp2(s − m_i)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = mma(cvt(p, v.dtype), v, acc * alpha[:, None], DOT_PREC)
    return acc, m_new, l_i


@triton.jit
def row_lo(qpos, q_ok, SEG_START, window, HAS_SEG: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Smallest key position visible to queries at absolute positions `qpos` (tensor or scalar)
    under the causal rule with documents (SEG_START: each position's document start) and a
    sliding window: query p sees the keys row_lo(p) <= s <= p."""
    lo = qpos * 0
    if HAS_WINDOW:
        lo = tl.maximum(lo, qpos - window + 1)
    if HAS_SEG:
        lo = tl.maximum(lo, tl.load(SEG_START + qpos, mask=q_ok, other=0))
    return lo


@triton.jit
def _bwd_preprocess(O, DO, DELTA, Tq, H: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK_M: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = offs_m < Tq
    # int64 base of the tile's first row (T·H·D may pass 2^31), int32 offsets inside the tile
    base = (b.to(tl.int64) * Tq + start_m) * (H * HEAD_DIM) + h * HEAD_DIM
    ptrs = base + tl.arange(0, BLOCK_M)[:, None] * (H * HEAD_DIM) + offs_d[None, :]
    o = tl.load(O + ptrs, mask=ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + ptrs, mask=ok[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + pid_bh.to(tl.int64) * Tq + offs_m, tl.sum(o * do, 1), mask=ok)


def bwd_delta(o, do):
    """delta = rowsum(o·do), fp32 [B, Hq, Tq], for contiguous o, do [B, Tq, Hq, D]: the
    preprocess of every softmax backward here (flash, MoBA, NSA's branches)."""
    B, tq, hq, d = o.shape
    delta = alloc.empty((B, hq, tq), torch.float32, o.device)
    # rows per program: 16 in the interpreter (many tile edges), else as many as keep the
    # fp32 O and dO tiles at 32 KB each (64 rows up to D = 128)
    bm = 16 if INTERPRET else (64 if d <= 128 else 32)
    _bwd_preprocess[(triton.cdiv(tq, bm), B * hq)](o, do, delta, tq, H=hq, HEAD_DIM=d,
                                                    BLOCK_M=bm)
    return delta
