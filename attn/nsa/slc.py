"""NSA's selected-block branch in Triton: forward (o, lse) and backward (dq, dk, dv; the dK/dV
kernels in attn/nsa/slc_dkdv.py).

Definition (attn/nsa/ref.py `slc_attn_ref`): query i at absolute position p = q_offset + i
attends, with one softmax, the keys s <= p of the blocks its GQA group selected,
SEL[b, i, hkv, :] (global block ids, −1 = empty slot); block j covers keys
[BLK_START[j], BLK_END[j]) (attn.moba.gate.block_table). All G = Hq/Hkv query heads of a group
share the selection, so every selected K/V block is loaded once for the whole group.

Memory plan
  _rows_kernel (forward, and dQ with DQ=True): one program = QPP consecutive query positions of
      one (batch, KV head); its tile rows are (position, head) pairs, M = QPP·GP rows (GP = G
      padded to a power of 2, QPP = max(1, FWD_ROWS // GP): 64 rows up to G = 64; tl.dot needs
      M >= 16, and M = 64 feeds the H100's wgmma). Registers: Q tile [M, D] (input dtype), the
      selection tile [M, NSEL_P] int32, fp32 accumulator [M, D] (o; or dQ, with dO [M, D] and
      lse, delta [M]), running max / sum [M]. Loop over the union of the tile's selected blocks
      in ascending id order (a row takes part in a block only if its position selected it): the
      block's K, V tile [BLOCK_N, D] (BLOCK_N >= sel_block) is loaded once for all heads of the
      group and all positions of the tile that chose it (neighbouring queries mostly share
      blocks, so K/V traffic drops up to QPP-fold). Writes O, LSE (fp32, natural log) or dQ once.
      Adaptive tiles: each 64-row tile runs either as it is (coarse launch) or as 16-row tiles
      (fine launch: positions whose picks barely overlap waste fewer masked rows), chosen per
      tile from both tilings' union counts (fine_tiles; TILES below). Each launch skips the
      other's tiles, so every row is written by one program.
      The union comes as a list (attn/nsa/union.py, U = QPP·NSEL_P <= MAX_UNION ids per tile):
      a counted loop whose K/V loads are software-pipelined; larger tiles (groups of 1-2 heads)
      search each next id over the tile's selection instead (every load then waits on it).
  dK/dV: attn/nsa/slc_dkdv.py (inverse index, per-block programs, split partials).

Masking: key s of block j pairs with row i when i selected j, BLK_START[j] <= s < BLK_END[j] and
s <= q_offset + i. Scores live in the log2 domain (s2 = q·k · scale·log2 e, every exponential is
exp2). With P = exp2(s2 − lse2) from the saved lse: dV = Pᵀ dO, dS = P ⊙ (dO Vᵀ − delta),
dK = scale · dSᵀ Q, dQ = scale · dS K, delta = rowsum(O ⊙ dO).
Contract: the blocks tile [0, Tk) in order, each at most sel_block long (block_table's do: dK/dV
of a key outside every block is never written; a longer block makes the rows / keys it touches
NaN). Checked with a ValueError on CPU tensors; on CUDA a check would cost a host sync. Ids
outside [0, NB) count as empty slots (ValueError on CPU); ids must not repeat within a row (the
forward would count such a block once, dK/dV twice). A row must see at least one key; one that
sees none gets o = 0, lse = +inf and zero gradients.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from attn.dispatch import INTERPRET, check_triton_inputs
from attn.flash import common
from attn.flash.bwd import bwd_delta
from attn.flash.common import LN2, LOG2E, LOG2E_F, cvt, mma
from attn.nsa.slc_dkdv import dkdv
from attn.nsa.union import tile_unions
from attn.triton_common import softmax_step


@triton.jit
def _block_step(q, do, lse2, delta, acc, m_i, l_i, bad, selt, j, bs, be, K, V, kv_base, row0,
                col, qpos, qk_scale, STRIDE_KT: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_N: tl.constexpr, DQ: tl.constexpr, DOT_PREC: tl.constexpr,
                TMA: tl.constexpr):
    """One selected block [bs, be) with id j for the rows that chose it: the online-softmax
    update of (acc, m_i, l_i) (forward) or the dQ accumulation (DQ); bad marks rows that met a
    block longer than BLOCK_N. TMA: K, V are tensor descriptors of the [B·Tk, Hkv·D] views, the
    tile at (row0 + bs, col); its keys past be (the next block's, or the next batch's, zeros past
    the tensor) are masked below."""
    hit = tl.max(tl.where(selt == j, 1, 0), 1) > 0
    kpos = bs + tl.arange(0, BLOCK_N)
    k_ok = kpos < be
    if TMA:
        k = K.load([row0 + bs, col])
        v = V.load([row0 + bs, col])
    else:
        # the block's first key in int64 (Tk·Hkv·D may pass 2^31), int32 inside the tile
        kv_off = kv_base + tl.cast(bs, tl.int64) * STRIDE_KT \
            + (tl.arange(0, BLOCK_N)[:, None] * STRIDE_KT + tl.arange(0, HEAD_DIM)[None, :])
        k = tl.load(K + kv_off, mask=k_ok[:, None], other=0.0)
        v = tl.load(V + kv_off, mask=k_ok[:, None], other=0.0)
    ok = hit[:, None] & k_ok[None, :] & (kpos[None, :] <= qpos[:, None])
    s = mma(q, tl.trans(k), None, DOT_PREC) * qk_scale
    if DQ:
        p = tl.where(ok, tl.math.exp2(s - lse2[:, None]), 0.0)
        dp = mma(do, tl.trans(v), None, DOT_PREC)
        ds = p * (dp - delta[:, None])
        acc = mma(cvt(ds, k.dtype), k, acc, DOT_PREC)
    else:
        acc, m_i, l_i = softmax_step(tl.where(ok, s, float("-inf")), v, acc, m_i, l_i,
                                     DOT_PREC)
    bad = bad | (hit & (be - bs > BLOCK_N))
    return acc, m_i, l_i, bad


@triton.jit
def _tile_rows(Q, K, V, O, LSE, DO, DELTA, SEL, BLK_START, BLK_END, UNION, USTART, UEND, UCNT,
               tile, n_tiles, pid_bh, scale, qk_scale, q_offset, Tq, Tk, NB,
               HQ: tl.constexpr, HKV: tl.constexpr, HEAD_DIM: tl.constexpr,
               NSEL: tl.constexpr, NSEL_P: tl.constexpr, GROUP_P: tl.constexpr,
               QPP: tl.constexpr, BLOCK_N: tl.constexpr, DQ: tl.constexpr,
               USE_UNION: tl.constexpr, DOT_PREC: tl.constexpr, ACC: tl.constexpr,
               TMA: tl.constexpr):
    """One tile: QPP positions from tile·QPP of (batch, KV head) pid_bh; its union list is row
    pid_bh·n_tiles + tile of UNION / USTART / UEND / UCNT. ACC (dQ only): add to the dQ rows
    already in O instead of overwriting them."""
    t0 = tile * QPP
    b = pid_bh // HKV
    hkv = pid_bh % HKV
    GROUP: tl.constexpr = HQ // HKV
    M: tl.constexpr = QPP * GROUP_P
    STRIDE_QT: tl.constexpr = HQ * HEAD_DIM
    STRIDE_KT: tl.constexpr = HKV * HEAD_DIM
    offs_m = tl.arange(0, M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_s = tl.arange(0, NSEL_P)
    rows = t0 + offs_m // GROUP_P
    g = offs_m % GROUP_P
    m_ok = (rows < Tq) & (g < GROUP)
    h = hkv * GROUP + g
    qpos = q_offset + rows
    q_off = (b.to(tl.int64) * Tq + rows) * STRIDE_QT + h * HEAD_DIM
    q = tl.load(Q + q_off[:, None] + offs_d[None, :], mask=m_ok[:, None], other=0.0)
    r_off = (b * HQ + h).to(tl.int64) * Tq + rows            # lse / delta [B, Hq, Tq]
    kv_base = b.to(tl.int64) * Tk * STRIDE_KT + hkv * HEAD_DIM
    row0 = b * Tk
    col = hkv * HEAD_DIM
    # the tile's selection; empty slots, bad ids and padding rows hold NB ("none")
    sel_off = ((b.to(tl.int64) * Tq + rows) * HKV + hkv) * NSEL
    selt = tl.load(SEL + sel_off[:, None] + offs_s[None, :],
                   mask=m_ok[:, None] & (offs_s < NSEL)[None, :], other=-1)
    selt = tl.where((selt >= 0) & (selt < NB), selt, NB)

    acc = tl.zeros([M, HEAD_DIM], dtype=tl.float32)
    bad = offs_m < 0                                         # rows that met a too-long block
    m_i = tl.zeros([M], dtype=tl.float32) - 1.0e30         # finite: a skipped block gives p = 0
    l_i = tl.zeros([M], dtype=tl.float32)
    if DQ:
        do = tl.load(DO + q_off[:, None] + offs_d[None, :], mask=m_ok[:, None], other=0.0)
        lse2 = tl.load(LSE + r_off, mask=m_ok, other=0.0) * LOG2E
        delta = tl.load(DELTA + r_off, mask=m_ok, other=0.0)
    else:                                                    # (unused by the forward)
        do = q
        lse2 = l_i
        delta = l_i
    if USE_UNION:
        # the union of the tile's blocks, ascending: ids and key ranges by position u, so the
        # K/V loads of later blocks are issued ahead (software pipeline) instead of each waiting
        # on the search for the next id
        u_row = pid_bh.to(tl.int64) * n_tiles + tile
        n_u = tl.load(UCNT + u_row)
        for u in range(0, n_u):
            j = tl.load(UNION + u_row * (QPP * NSEL_P) + u)
            bs = tl.load(USTART + u_row * (QPP * NSEL_P) + u)
            be = tl.load(UEND + u_row * (QPP * NSEL_P) + u)
            acc, m_i, l_i, bad = _block_step(q, do, lse2, delta, acc, m_i, l_i, bad, selt, j, bs,
                                             be, K, V, kv_base, row0, col, qpos, qk_scale,
                                             STRIDE_KT, HEAD_DIM, BLOCK_N, DQ, DOT_PREC, TMA)
    else:
        j = tl.min(tl.min(selt, 1), 0)
        while j < NB:  # the union of the rows' blocks, ascending
            bs = tl.load(BLK_START + j)
            be = tl.load(BLK_END + j)
            acc, m_i, l_i, bad = _block_step(q, do, lse2, delta, acc, m_i, l_i, bad, selt, j, bs,
                                             be, K, V, kv_base, row0, col, qpos, qk_scale,
                                             STRIDE_KT, HEAD_DIM, BLOCK_N, DQ, DOT_PREC, TMA)
            j = tl.min(tl.min(tl.where(selt > j, selt, NB), 1), 0)

    o_ptrs = O + q_off[:, None] + offs_d[None, :]
    if DQ:
        acc = tl.where(bad[:, None], float("nan"), acc * scale)
        if ACC:  # one rounding of the sum (the other branches' dQ is already there)
            acc += tl.load(o_ptrs, mask=m_ok[:, None], other=0.0).to(tl.float32)
        tl.store(o_ptrs, cvt(acc, O.dtype.element_ty), mask=m_ok[:, None])
    else:
        seen = l_i > 0.0
        l_safe = tl.where(seen, l_i, 1.0)
        acc = tl.where(bad[:, None], float("nan"), acc / l_safe[:, None])
        lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * LN2, float("inf"))
        tl.store(o_ptrs, cvt(acc, O.dtype.element_ty), mask=m_ok[:, None])
        tl.store(LSE + r_off, tl.where(bad, float("nan"), lse), mask=m_ok)


@triton.jit
def _rows_kernel(Q, K, V, O, LSE, DO, DELTA, SEL, BLK_START, BLK_END, UNION, USTART, UEND, UCNT,
                 FINE, n_tiles, n_coarse, scale, qk_scale, q_offset, Tq, Tk, NB,
                 HQ: tl.constexpr, HKV: tl.constexpr, HEAD_DIM: tl.constexpr,
                 NSEL: tl.constexpr, NSEL_P: tl.constexpr, GROUP_P: tl.constexpr,
                 QPP: tl.constexpr, BLOCK_N: tl.constexpr, DQ: tl.constexpr,
                 USE_UNION: tl.constexpr, DOT_PREC: tl.constexpr, TILES: tl.constexpr,
                 PER: tl.constexpr, SUB: tl.constexpr, ACC: tl.constexpr, TMA: tl.constexpr):
    """DQ=False: forward, writes O and LSE. DQ=True: reads LSE, DO, DELTA, writes dQ into O
    (ACC: adds it to what O holds).
    USE_UNION: walk each tile's union list (tile_unions); else find each next block id by a
    search over the tile's selection. One program per SUB consecutive tiles of this tiling
    (grid axis 0, latest positions first) and (batch, KV head) (axis 1). TILES: 0 = one tiling,
    every tile; 1 = the coarse launch of the adaptive pair: skips tiles with
    FINE[b·hkv, tile] != 0; 2 = the fine launch (PER fine tiles per coarse one, n_coarse coarse
    tiles): runs the fine tiles whose coarse tile has FINE != 0. SUB = PER gives a program a
    whole coarse tile's fine tiles in turn (few programs to skip)."""
    top = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    if TILES != 0:
        fine = tl.load(FINE + pid_bh.to(tl.int64) * n_coarse + (top * SUB) // PER)
        if TILES == 1:
            if fine != 0:
                return
        else:
            if fine == 0:
                return
    for sub in range(SUB):
        tile = top * SUB + sub
        if tile < n_tiles:
            _tile_rows(Q, K, V, O, LSE, DO, DELTA, SEL, BLK_START, BLK_END, UNION, USTART, UEND,
                       UCNT, tile, n_tiles, pid_bh, scale, qk_scale, q_offset, Tq, Tk, NB, HQ,
                       HKV, HEAD_DIM, NSEL, NSEL_P, GROUP_P, QPP, BLOCK_N, DQ, USE_UNION,
                       DOT_PREC, ACC, TMA)


# ---------------------------------------------------------------------------------------------
# launch

_HEAD_DIMS = (16, 32, 64, 128)
MAX_NSEL = 32
MAX_GROUP = 64
MAX_SEL_BLOCK = 128
# Tile rows: forward / dQ FWD_ROWS (position, head) rows. H100, triton 3.6,
# B=1, T=64k, D=128, bf16, NSEL=16, sel_block=64; "random": iid selections, "shared": the 64
# queries of a block share their extra blocks (block 0, own and previous block always in):
#   Hq/Hkv=64/4  fwd: FWD_ROWS=16 33.2 / 33.5 ms (random / shared), 64: 29.5 / 10.0 (128, 8 warps
#                55.6 / 11.0); fwd+bwd at 64: 88 / 47 ms
#   Hq/Hkv=16/4  fwd: 16: 24.5 / 8.1 ms, 64: 22.6 / 2.6; fwd+bwd at 64: 56 / 14.5 ms
# (random selections are bound by L2 / HBM traffic: T·Hkv·NSEL K/V blocks of 32 KB.) ptxas
# sm_90a (bf16, D=128): fwd 174-201 regs, dQ 202-203, no spills. (dK/dV: attn/nsa/slc_dkdv.py.)
# H200, 2026-11-26, with the union lists (docs/bench/nsa_slc_rows_sweep_h200.json), 64k, 64/4
# random: forward FWD_ROWS 64 / 32 / 16 (3 stages) 23.2 / 26.4 / 19.2 ms, dQ 64 (1 stage) 26.6,
# 16 (2 stages) 20.7; 16/4: forward 18.4 → 14.8, dQ 21.6 → 18.3; 16k 64/4: 4.98 → 4.70, 5.59 →
# 5.00: random selections share few blocks within a tile, so a 64-row tile mostly multiplies
# masked rows. But when the 64 queries of a block share their picks (as a trained model's
# neighbours mostly do; ..._shared_h200.json), 64 rows take 8.0 / 9.4 ms (fwd / dQ) and 16 rows
# 19.1 / 20.4 (16/4: 2.9 / 3.3 against 5.1 / 6.2): 64 rows stay, for what training sees.
FWD_ROWS, FWD_WARPS = 64, 4
# Adaptive tiles (TILES = "adaptive"): each coarse tile of FWD_ROWS rows goes to the coarse or
# to the fine launch (FINE_ROWS-row tiles: one position x 16 heads at group 16), whichever does
# less work by the union counts: fine when COARSE_STEP_COST·U_coarse > FINE_STEP_COST·ΣU_fine.
# H100, 64k, fwd / dQ time against the mean union sizes while a share of the queries takes its
# 64-query block's picks (docs/bench/nsa_tiles_h100.json): a fine step costs 0.65-0.71 of a
# coarse one (64/4: coarse 7.9 ms at U = 15.9 -> 22.5 at U = 50.3, i.e. 0.42 ms per unit of U;
# fine 19.1 ms at ΣU = 63.5, 0.30; 16/4: 0.109 vs 0.071; dQ 0.64 in both). So random-like
# selections take 16-row tiles, shared ones keep 64 rows, and tiles in between go either way.
# "coarse" / "fine" force one tiling (NSA_SLC_TILES=coarse|fine; tests, sweeps). Groups with
# equal tilings (G >= 64) or without union lists for the coarse tiles (G <= 2) take the coarse
# tiling.
TILES = os.environ.get("NSA_SLC_TILES", "adaptive")
# K/V block tiles through TMA tensor descriptors made on the host (common.use_tma: Hopper,
# alignment, FLASH_TMA; NSA_SLC_TMA=0 turns it off here alone). H100, random selections, pointer
# loads -> TMA, ms (docs/bench/nsa_slc_tma_h100.txt; outputs bitwise equal): forward 64k 64/4
# 18.97 -> 17.90, 64k 16/4 15.36 -> 14.21, 16k 16/4 3.14 -> 2.79; but the whole backward (dQ
# launches + dK/dV) 64k 64/4 38.9 -> 41.2 (16/4: 24.5 -> 23.7, 16k 5.51 -> 5.73): the dQ keeps
# pointer loads. (Descriptors made inside the kernel cost every program: forward 64/4 19.1.)
TMA = {"fwd": os.environ.get("NSA_SLC_TMA", "1") != "0", "dq": False}
FINE_ROWS = 16
COARSE_STEP_COST, FINE_STEP_COST = 3, 2
# pipeline depth of the fine tiles' loops. With the dQ's 168-register cap (below) 3 stages keep
# three programs per SM: fine dQ launches 2 -> 3 stages, 64k 64 / 4 21.11, 21.14 -> 20.48, 20.67
# ms; 64k 16 / 4 16.81, 17.13 -> 16.24, 16.53; 16k 16 / 4 3.58, 3.61 -> 3.55, 3.61; 4 stages
# slower (H100, docs/bench/nsa_slc_fine_h100_s9.json; 2 or 8 warps instead of 4 were slower)
FINE_FWD_STAGES, FINE_DQ_STAGES = 3, 3
# pipeline depth of the union loop (H200, 64k, 64/4 random: fwd stages 1/2/3/4 27.3 / 25.4 /
# 24.0 / 39.5 ms; dQ + dK/dV 54.9 / 57.7 / 75.2 / 75.0: the dQ tile with deeper pipelines loses
# occupancy; the while loop over the next smallest id it replaces: 30.0 / 59.0)
FWD_STAGES, DQ_STAGES = 3, 1
DQ_WARPS = FWD_WARPS
# registers per thread of the dQ launches (the forward's take the compiler's choice). The
# coarse dQ program takes 243 at one stage (two programs per SM); capped at 168 three fit (40
# bytes spill): 64k dQ at group 4 (16 / 4) 18.30 -> 16.64 ms, group 16 (64 / 4, mostly fine
# tiles, 158 registers anyway) 20.96 -> 21.10; a cap of 128 is slower for both, and no cap
# helps the forward or dK/dV (H100, docs/bench/nsa_select_caps_h100_s9.json)
DQ_MAXNREG = 168
# union lists (tile_unions) up to U = QPP·NSEL_P ids per tile: the O(U²) comparisons of
# _union_kernel grow past the gain beyond (U = 1024, Hq = Hkv: 10 ms at 64k); larger tiles
# (groups of 1-2 heads) search the next id instead
MAX_UNION = 256


def _check(q, k, v, sel, blk_start, blk_end, scale, sel_block, q_offset):
    """Validate the inputs (ValueError naming the rule); returns the scale as a float."""
    for name, t in (("q", q), ("k", k), ("v", v), ("sel", sel)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor, got {getattr(t, 'shape', type(t))}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: expected "
                         "q [B, Tq, Hq, D] and k, v [B, Tk, Hkv, D]")
    B, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    if hkv == 0 or hq % hkv or not 1 <= hq // hkv <= MAX_GROUP:
        raise ValueError(f"Hq={hq} must be a multiple of Hkv={hkv} with group size "
                         f"Hq/Hkv <= {MAX_GROUP}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_triton_inputs(q, _HEAD_DIMS, "slc_attn: ")
    nsel = sel.shape[-1]
    if sel.dtype != torch.int32 or tuple(sel.shape[:3]) != (B, tq, hkv) \
            or not 1 <= nsel <= MAX_NSEL:
        raise ValueError(f"sel ({sel.dtype}, {tuple(sel.shape)}) must be int32 [B, Tq, Hkv, NSEL]"
                         f" = [{B}, {tq}, {hkv}, NSEL] with 1 <= NSEL <= {MAX_NSEL}")
    for name, t in (("blk_start", blk_start), ("blk_end", blk_end)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.dim() != 1 \
                or t.numel() == 0 or t.shape != blk_start.shape:
            raise ValueError(f"{name} must be a non-empty int32 [NB] tensor like blk_start, got "
                             f"{getattr(t, 'dtype', type(t))} {tuple(getattr(t, 'shape', ()))}")
    for name, t in (("q", q), ("k", k), ("v", v), ("sel", sel), ("blk_start", blk_start),
                    ("blk_end", blk_end)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}: one device")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (strides {t.stride()}); call "
                             ".contiguous() first")
    if not q.is_cuda and not INTERPRET:
        raise ValueError("slc_attn's Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set "
                         f"before import), got {q.device}")
    if not isinstance(q_offset, int) or q_offset < 0 or q_offset + tq > tk:
        raise ValueError(f"q_offset={q_offset!r} must be an int with 0 <= q_offset and "
                         f"q_offset + Tq <= Tk (Tq={tq}, Tk={tk})")
    if not isinstance(sel_block, int) or not 1 <= sel_block <= MAX_SEL_BLOCK:
        raise ValueError(f"sel_block={sel_block!r} must be an int in [1, {MAX_SEL_BLOCK}]")
    # T·H·D may pass 2^31 (row offsets are int64); the dK/dV inverse index is int32
    if B * tq * hkv * nsel >= 2 ** 31:
        raise ValueError(f"B*Tq*Hkv*NSEL={B * tq * hkv * nsel} must be < 2**31 (the dK/dV "
                         "inverse index stores int32 positions into the selection list)")
    scale = float(d ** -0.5 if scale is None else scale)
    if not scale > 0:
        raise ValueError(f"scale={scale!r} must be > 0")
    if not q.is_cuda:  # value checks: free on CPU, a host sync on CUDA (see the docstring)
        nb = blk_start.numel()
        if bool(((sel < -1) | (sel >= nb)).any()):
            raise ValueError(f"sel holds ids outside [-1, NB) with NB={nb} blocks")
        if int(blk_start[0]) != 0 or int(blk_end[-1]) != tk \
                or not torch.equal(blk_start[1:], blk_end[:-1]) \
                or bool(((blk_end - blk_start) > sel_block).any() | (blk_end <= blk_start).any()):
            raise ValueError(f"blocks [blk_start, blk_end) must tile [0, Tk={tk}) in order (as "
                             f"block_table's do), each of 1 to sel_block={sel_block} keys")
    return scale


def _block_n(sel_block):
    return max(16, triton.next_power_of_2(sel_block))


def _meta(q, k, sel, rows=None):
    """Kernel constants for tiles of `rows` (position, head) rows (default FWD_ROWS)."""
    hq, hkv = q.shape[2], k.shape[2]
    nsel = sel.shape[-1]
    gp = triton.next_power_of_2(hq // hkv)
    rows = FWD_ROWS if rows is None else rows
    return dict(HQ=hq, HKV=hkv, HEAD_DIM=q.shape[3], NSEL=nsel,
                NSEL_P=max(2, triton.next_power_of_2(nsel)), GROUP_P=gp,
                QPP=max(1, rows // gp), DOT_PREC=common.dot_precision(q.dtype))


def _listed(meta):
    """Whether tiles of this meta get union lists (else the kernel searches each next id)."""
    return meta["QPP"] * meta["NSEL_P"] <= MAX_UNION


def fine_tiles(ucnt_coarse, ucnt_fine, per_coarse):
    """int32 [B·Hkv, n_coarse]: 1 where the coarse tile's fine tiles do fewer weighted block
    steps (COARSE_STEP_COST·U_coarse > FINE_STEP_COST·ΣU_fine); small torch ops, no sync."""
    bh, nt = ucnt_coarse.shape
    fine = torch.nn.functional.pad(ucnt_fine, (0, nt * per_coarse - ucnt_fine.shape[1]))
    steps_fine = fine.view(bh, nt, per_coarse).sum(-1)
    return (COARSE_STEP_COST * ucnt_coarse > FINE_STEP_COST * steps_fine).to(torch.int32)


def _tile_plans(q, k, sel, blk_start, blk_end):
    """[(meta, unions or None, FINE flags or None, TILES, fine tiles per coarse one, whether the
    tiles are the fine ones)] for the launches of one pass."""
    if TILES not in ("adaptive", "coarse", "fine"):
        raise ValueError(f"attn.nsa.slc.TILES={TILES!r} must be adaptive, coarse or fine")
    nb = blk_start.numel()
    coarse, fine = _meta(q, k, sel), _meta(q, k, sel, FINE_ROWS)
    per = coarse["QPP"] // fine["QPP"]
    mode = "coarse" if per == 1 or (TILES == "adaptive" and not _listed(coarse)) else TILES
    if mode != "adaptive":
        meta = coarse if mode == "coarse" else fine
        unions = tile_unions(sel, nb, meta, blk_start, blk_end) if _listed(meta) else None
        return [(meta, unions, None, 0, 1, mode == "fine")]
    uc = tile_unions(sel, nb, coarse, blk_start, blk_end)
    uf = tile_unions(sel, nb, fine, blk_start, blk_end, per_program=per)
    flags = fine_tiles(uc[3], uf[3], per)
    return [(coarse, uc, flags, 1, per, False), (fine, uf, flags, 2, per, True)]


def _kv_tiles(k, v, sel_block, dq_mode):
    """(K, V, TMA) for _rows_kernel: host-side TMA descriptors over the [B·Tk, Hkv·D] views
    (made once per launch: a descriptor built inside the kernel costs every program, and the fine
    tiles are many short programs), or the tensors themselves."""
    if not (TMA["dq" if dq_mode else "fwd"] and common.use_tma("dq", k, v)):
        return k, v, False
    from triton.tools.tensor_descriptor import TensorDescriptor
    B, tk, hkv, d = k.shape
    block = [_block_n(sel_block), d]
    return (TensorDescriptor.from_tensor(k.view(B * tk, hkv * d), block),
            TensorDescriptor.from_tensor(v.view(B * tk, hkv * d), block), True)


def _launch_rows(q, k, v, out, lse, do, delta, sel, blk_start, blk_end, scale, sel_block,
                 q_offset, dq_mode, accumulate=False):
    B, tq = q.shape[:2]
    nb = blk_start.numel()
    kt, vt, tma = _kv_tiles(k, v, sel_block, dq_mode)
    for meta, unions, flags, tiles, per, is_fine in _tile_plans(q, k, sel, blk_start, blk_end):
        if dq_mode:
            stages = FINE_DQ_STAGES if is_fine else DQ_STAGES
        else:
            stages = FINE_FWD_STAGES if is_fine else FWD_STAGES
        n_tiles = triton.cdiv(tq, meta["QPP"])
        # the fine forward runs a coarse tile's fine tiles in one program (fewer programs to
        # skip: 64/4 all coarse 8.72 -> 8.40 ms, random 19.16 -> 18.90); the fine dQ is faster
        # one tile per program (random 21.22 vs 22.91 ms; H100, docs/bench/nsa_tiles_h100.json)
        sub = per if tiles == 2 and not dq_mode else 1
        grid = (triton.cdiv(n_tiles, sub), B * k.shape[2])
        _rows_kernel[grid](q, kt, vt, out, lse, do, delta, sel, blk_start, blk_end,
                           *(unions or (sel,) * 4), sel if flags is None else flags, n_tiles,
                           1 if flags is None else flags.shape[1], scale, scale * LOG2E_F,
                           q_offset, tq, k.shape[1], nb, **meta, BLOCK_N=_block_n(sel_block),
                           DQ=dq_mode, USE_UNION=unions is not None, TILES=tiles,
                           PER=per if tiles == 2 else 1, SUB=sub, ACC=accumulate,
                           TMA=tma,
                           num_warps=DQ_WARPS if dq_mode else FWD_WARPS,
                           **common.reg_cap(DQ_MAXNREG if dq_mode else None),
                           num_stages=1 if INTERPRET else stages)


def slc_attn_fwd(q, k, v, sel, blk_start, blk_end, *, scale, sel_block, q_offset=0):
    """Forward primitive (no autograd): (o [B, Tq, Hq, D] in q's dtype, lse [B, Hq, Tq] fp32,
    natural log)."""
    scale = _check(q, k, v, sel, blk_start, blk_end, scale, sel_block, q_offset)
    B, tq, hq, _ = q.shape
    o = common.empty(q.shape, q.dtype, q.device)
    lse = common.empty((B, hq, tq), torch.float32, q.device)
    _launch_rows(q, k, v, o, lse, q, lse, sel, blk_start, blk_end, scale, sel_block, q_offset,
                 False)
    return o, lse


def slc_attn_bwd(do, q, k, v, o, lse, sel, blk_start, blk_end, *, scale, sel_block, q_offset=0,
                 delta=None, dq=None):
    """Backward primitive: (dq, dk, dv) shaped like q, k, v, given dO and the forward's o, lse.
    delta: rowsum(o·do) fp32 [B, Hq, Tq] if the caller has it (attn/nsa/gate_mix.py does), else
    computed here; dq: a contiguous tensor like q to add this branch's dQ to (returned)."""
    scale = _check(q, k, v, sel, blk_start, blk_end, scale, sel_block, q_offset)
    B, tq, hq, d = q.shape
    for name, t in (("do", do), ("o", o)):
        if not isinstance(t, torch.Tensor) or t.shape != q.shape or t.dtype != q.dtype \
                or t.device != q.device or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous tensor like q ({tuple(q.shape)}, "
                             f"{q.dtype}), got {getattr(t, 'dtype', type(t))} "
                             f"{tuple(getattr(t, 'shape', ()))}")
    if not isinstance(lse, torch.Tensor) or lse.shape != (B, hq, tq) \
            or lse.dtype != torch.float32 or not lse.is_contiguous() or lse.device != q.device:
        raise ValueError(f"lse must be contiguous fp32 [B, Hq, Tq] = {(B, hq, tq)}, got "
                         f"{getattr(lse, 'dtype', type(lse))} {tuple(getattr(lse, 'shape', ()))}")
    common.check_bwd_buffers(q, delta, dq, "slc_attn_bwd: ")
    if delta is None:
        delta = bwd_delta(o, do)
    accumulate = dq is not None
    if dq is None:
        dq = common.empty(q.shape, q.dtype, q.device)
    _launch_rows(q, k, v, dq, lse, do, delta, sel, blk_start, blk_end, scale, sel_block,
                 q_offset, True, accumulate)

    dk, dv = dkdv(q, k, v, do, lse, delta, sel, blk_start, blk_end, scale, q_offset,
                  _block_n(sel_block))
    return dq, dk, dv


class SlcAttnFunction(torch.autograd.Function):
    """Triton forward / backward of the selected branch; sel and the block table are inputs
    (not differentiated)."""

    @staticmethod
    def forward(ctx, q, k, v, sel, blk_start, blk_end, scale, sel_block, q_offset):
        o, lse = slc_attn_fwd(q, k, v, sel, blk_start, blk_end, scale=scale,
                              sel_block=sel_block, q_offset=q_offset)
        ctx.save_for_backward(q, k, v, o, lse, sel, blk_start, blk_end)
        ctx.args = (scale, sel_block, q_offset)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, sel, blk_start, blk_end = ctx.saved_tensors
        scale, sel_block, q_offset = ctx.args
        dq, dk, dv = slc_attn_bwd(do.contiguous(), q, k, v, o, lse, sel, blk_start, blk_end,
                                  scale=scale, sel_block=sel_block, q_offset=q_offset)
        return dq, dk, dv, None, None, None, None, None, None


def slc_attn(q, k, v, sel, blk_start, blk_end, *, scale=None, sel_block: int = 64,
             q_offset: int = 0):
    """Selected-block attention (Triton), differentiable w.r.t. q, k, v: o [B, Tq, Hq, D]."""
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    return SlcAttnFunction.apply(q, k, v, sel, blk_start, blk_end, scale, sel_block, q_offset)
