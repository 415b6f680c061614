"""MoBA gating: mean-pooled keys per block and the top-(k−1) block selection.

Blocks are numbered globally over the key sequence: document after document, block j of a
document covering keys [doc_start + j·bs, min(doc_start + (j+1)·bs, doc_end)). The candidates of
a query at position p are the earlier blocks of its own document, a contiguous global range
[FIRSTB[p], KBLK[p]) (first block of p's document .. p's own block, exclusive): no scores
outside that range are ever computed, and nothing of size T × T or T × n_blocks is stored.

Memory plan
  block table (attn/common/documents.py, torch on the device): KBLK, FIRSTB int32 [Tk];
                 BLK_START, BLK_END int32 [NB]
  _pool_kernel : one program per (block, batch·KV head); streams the block's keys in BLOCK_N
                 rows, fp32 column sums by MMA with ones ([16, D] in registers); writes the
                 block mean once (incomplete last blocks are pooled too but are never
                 candidates): MK fp32 [B, NB, Hkv, D] for fp32 keys; for 16-bit keys the mean
                 split in three parts of K's dtype, hi + mid + lo (24 significant bits, like
                 fp32), MK [3, B, NB, Hkv, D]
  _topk_kernel : one program per (BLOCK_M queries, batch·query head); the query tile [BLOCK_M, D]
                 in registers, a running top-(k−1) per row ([BLOCK_M, KP] values and block ids,
                 KP = next power of 2 ≥ k−1, ≤ 16); streams the block means of the tile's
                 candidate range BLOCK_J blocks at a time ([BLOCK_J, D] per part, read once
                 per tile), scores them with MMAs (16-bit inputs: one per part, fp32-accurate)
                 and merges the chunk in k−1 rounds of (max, argmax);
                 writes SEL int32 [B, Hq, Tq, k−1] once (−1: no block in that slot).
Gate scores are q·mean(K_block) in fp32 without the softmax scale (a positive factor does not
change the ranking; the ref scores in float64). Ties go to the earlier block.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from attn.common import alloc
from attn.common.jit import cvt, mma
from attn.common.launch import dot_precision
from attn.dispatch import INTERPRET


@triton.jit
def _pool_kernel(K, MK, BLK_START, BLK_END, Tk, NB,
                 HKV: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                 DOT_PREC: tl.constexpr, SPLIT3: tl.constexpr):
    j = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HKV
    hkv = pid_bh % HKV
    STRIDE_KT: tl.constexpr = HKV * HEAD_DIM
    k_base = K + b.to(tl.int64) * Tk * STRIDE_KT + hkv * HEAD_DIM
    start = tl.load(BLK_START + j)
    end = tl.load(BLK_END + j)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    # column sums as an MMA with a matrix of ones (exact products, fp32 accumulation): the loop
    # then has a dot, which the compiler software-pipelines (several key chunks in flight); every
    # one of the 16 result rows holds the same sums
    ones = tl.full([16, BLOCK_N], 1.0, K.dtype.element_ty)
    acc = tl.zeros([16, HEAD_DIM], dtype=tl.float32)
    tile = offs_n[:, None] * STRIDE_KT + offs_d[None, :]  # int32 offsets inside one key chunk
    for s0 in range(start, end, BLOCK_N):
        kpos = s0 + offs_n
        # the chunk's first row in int64 (Tk·Hkv·D may pass 2^31)
        kt = tl.load(k_base + tl.cast(s0, tl.int64) * STRIDE_KT + tile,
                     mask=(kpos < end)[:, None], other=0.0)
        acc = mma(ones, kt, acc, DOT_PREC)
    mean = tl.max(acc, 0) / (end - start).to(tl.float32)
    mk_off = ((b.to(tl.int64) * NB + j) * HKV + hkv) * HEAD_DIM + offs_d
    if SPLIT3:
        # the fp32 mean as hi + mid + lo in K's 16-bit dtype (24 significant bits, like fp32),
        # split once here rather than by every query tile that scores the block
        part = tl.cast(tl.num_programs(0), tl.int64) * tl.num_programs(1) * HEAD_DIM  # B·NB·Hkv·D
        hi = cvt(mean, K.dtype.element_ty)
        r1 = mean - hi.to(tl.float32)
        mid = cvt(r1, K.dtype.element_ty)
        tl.store(MK + mk_off, hi)
        tl.store(MK + part + mk_off, mid)
        tl.store(MK + 2 * part + mk_off, cvt(r1 - mid.to(tl.float32), K.dtype.element_ty))
    else:
        tl.store(MK + mk_off, mean)


@triton.jit
def _topk_kernel(Q, MK, SEL, KBLK, FIRSTB, q_offset, Tq, NB, B,
                 HQ: tl.constexpr, HKV: tl.constexpr, HEAD_DIM: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr, NSEL: tl.constexpr,
                 KP: tl.constexpr, SPLIT3: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    pid_bh = tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    hkv = h // (HQ // HKV)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_ok = offs_m < Tq
    qpos = q_offset + offs_m
    # int64 base of the query tile (Tq·Hq·D may pass 2^31), int32 offsets inside it
    q = tl.load(Q + (b.to(tl.int64) * Tq + start_m) * (HQ * HEAD_DIM) + h * HEAD_DIM
                + (tl.arange(0, BLOCK_M)[:, None] * (HQ * HEAD_DIM) + offs_d[None, :]),
                mask=m_ok[:, None], other=0.0)
    if not SPLIT3:
        q = q.to(tl.float32)
    # candidate range per row: [c_lo, c_hi); padding rows get an empty range
    c_lo = tl.load(FIRSTB + qpos, mask=m_ok, other=0)
    c_hi = tl.load(KBLK + qpos, mask=m_ok, other=0)
    slot = tl.arange(0, KP)
    # slots >= NSEL (power-of-2 padding) hold +inf: never the worst, never replaced
    vals = tl.where(slot[None, :] < NSEL, float("-inf"), float("inf")) + tl.zeros(
        [BLOCK_M, KP], dtype=tl.float32)
    idx = tl.zeros([BLOCK_M, KP], dtype=tl.int32) - 1
    j_lo = tl.min(tl.where(m_ok, c_lo, NB), 0)
    j_hi = tl.max(tl.where(m_ok, c_hi, 0), 0)
    mk_base = MK + (b.to(tl.int64) * NB * HKV + hkv) * HEAD_DIM
    offs_j = tl.arange(0, BLOCK_J)
    part = tl.cast(B, tl.int64) * NB * HKV * HEAD_DIM  # one part of the split means
    for j0 in range(j_lo, j_hi, BLOCK_J):
        jj = j0 + offs_j
        mk_tile = mk_base + jj[:, None] * (HKV * HEAD_DIM) + offs_d[None, :]
        j_ok = (jj < j_hi)[:, None]
        if SPLIT3:
            # the means' hi + mid + lo parts (_pool_kernel), in q's 16-bit dtype; q is exact in
            # its dtype, so three MMAs give fp32-accurate scores on tensor cores
            hi = tl.load(mk_tile, mask=j_ok, other=0.0)                     # [BLOCK_J, D]
            mid = tl.load(mk_tile + part, mask=j_ok, other=0.0)
            lo = tl.load(mk_tile + 2 * part, mask=j_ok, other=0.0)
            s = mma(q, tl.trans(hi), None, "tf32")
            s = mma(q, tl.trans(mid), s, "tf32")
            s = mma(q, tl.trans(lo), s, "tf32")
        else:
            mk = tl.load(mk_tile, mask=j_ok, other=0.0)                     # [BLOCK_J, D] fp32
            s = mma(q, tl.trans(mk), None, "ieee")                          # [BLOCK_M, BLOCK_J]
        valid = (jj[None, :] >= c_lo[:, None]) & (jj[None, :] < c_hi[:, None])
        s = tl.where(valid, s, float("-inf"))
        # NSEL rounds: the chunk's best remaining block (value, then smallest id) replaces the
        # running list's worst entry (smallest value, then largest id) when it ranks higher.
        # The list ends as the top NSEL by (value desc, block id asc), whatever the order seen.
        for _ in tl.static_range(NSEL):
            cm = tl.max(s, 1)
            ci = tl.min(tl.where(s == cm[:, None], jj[None, :], 2 ** 30), 1)
            mn = tl.min(vals, 1)
            wid = tl.max(tl.where(vals == mn[:, None], idx, -2), 1)
            at = tl.min(tl.where((vals == mn[:, None]) & (idx == wid[:, None]), slot[None, :],
                                 KP), 1)
            better = (cm > float("-inf")) & ((cm > mn) | ((cm == mn) & (ci < wid)))
            rep = better[:, None] & (slot[None, :] == at[:, None])
            vals = tl.where(rep, cm[:, None], vals)
            idx = tl.where(rep, ci[:, None], idx)
            s = tl.where(jj[None, :] == ci[:, None], float("-inf"), s)
    tl.store(SEL + (pid_bh.to(tl.int64) * Tq + offs_m[:, None]) * NSEL + slot[None, :], idx,
             mask=m_ok[:, None] & (slot[None, :] < NSEL))


INTERP_POOL_N = 16  # interpreter: keys per pooling chunk (small: many chunk edges)
INTERP_TOPK_M = 16  # interpreter: query rows per top-k tile
GPU_POOL_N = 64  # keys per pooling chunk on the GPU
# (BLOCK_M, BLOCK_J, warps, stages) of the top-k kernel, stages of the means' parts loads: the
# sweep's fastest (docs/moba_notes.md)
GPU_TOPK = (256, 32, 8, 2)


def select_blocks(q, k, table, topk: int, q_offset: int):
    """SEL int32 [B, Hq, Tq, max(topk−1, 1)]: global ids of each row's chosen earlier blocks,
    −1 in unused slots (all −1 when topk == 1: the query's own block only)."""
    B, tq, hq, d = q.shape
    hkv = k.shape[2]
    kblk, firstb, blk_start, _ = table
    nb = blk_start.numel()
    nsel = topk - 1
    if nsel == 0:
        return torch.full((B, hq, tq, 1), -1, dtype=torch.int32, device=q.device)
    mk = pool_means(k, table)
    sel = alloc.empty((B, hq, tq, nsel), torch.int32, q.device)
    bm, bj, w, st = (INTERP_TOPK_M, 16, 4, 1) if INTERPRET else GPU_TOPK
    _topk_kernel[(triton.cdiv(tq, bm), B * hq)](q, mk, sel, kblk, firstb, q_offset, tq, nb, B,
                                                 HQ=hq, HKV=hkv, HEAD_DIM=d, BLOCK_M=bm,
                                                 BLOCK_J=bj, NSEL=nsel,
                                                 KP=triton.next_power_of_2(nsel),
                                                 SPLIT3=_split3(q.dtype), num_warps=w,
                                                 num_stages=st)
    return sel


def _split3(dtype) -> bool:
    return dtype in (torch.bfloat16, torch.float16)


def pool_means(k, table):
    """The block means of k [B, Tk, Hkv, D]: fp32 [B, NB, Hkv, D] for fp32 keys; for 16-bit
    keys their hi, mid, lo parts in k's dtype, [3, B, NB, Hkv, D] (hi + mid + lo = the fp32
    mean)."""
    B, tk, hkv, d = k.shape
    _, _, blk_start, blk_end = table
    nb = blk_start.numel()
    split3 = _split3(k.dtype)
    mk = alloc.empty((3, B, nb, hkv, d) if split3 else (B, nb, hkv, d),
                     k.dtype if split3 else torch.float32, k.device)
    pool_n = INTERP_POOL_N if INTERPRET else GPU_POOL_N
    _pool_kernel[(nb, B * hkv)](k, mk, blk_start, blk_end, tk, nb, HKV=hkv, HEAD_DIM=d,
                                BLOCK_N=pool_n, DOT_PREC=dot_precision(k.dtype), SPLIT3=split3,
                                num_warps=4, num_stages=1 if INTERPRET else 3)
    return mk
