"""NSA's selected-block branch in Triton: forward (o, lse) and backward (dq, dk, dv; dK/dV in
slc_dkdv.py). Definition (attn/nsa/ref.py `slc_attn_ref`): query i at absolute position
p = q_offset + i attends, with one softmax, the keys s <= p of the blocks its GQA group selected,
SEL[b, i, hkv, :] (global block ids, −1 = empty slot); block j covers keys
[BLK_START[j], BLK_END[j]) (attn.common.documents.block_table).

Memory plan (_rows_kernel, forward and dQ): one program = QPP consecutive positions of one
(batch, KV head), tile rows the (position, head) pairs, M = QPP·GP (GP = G padded to a power of
2). Registers: Q [M, D], the selection [M, NSEL_P] int32, fp32 accumulator [M, D] (o; or dQ, with
dO [M, D] and lse, delta [M]), running max / sum [M]. The loop walks the union of the tile's
selected blocks in ascending id order (union.py's list, or a search for each next id): each
block's K, V [BLOCK_N, D] (BLOCK_N >= sel_block) is loaded once for every head and position that
chose it. Tiles are coarse (FWD_ROWS rows) or fine (FINE_ROWS), chosen per tile (fine_tiles).
Masking: key s of block j pairs with row i when i selected j, BLK_START[j] <= s < BLK_END[j] and
s <= p. Contract (checked on CPU; on CUDA a check would cost a host sync): the blocks tile
[0, Tk) in order, each at most sel_block long (a longer one makes its rows NaN); ids outside
[0, NB) are empty slots; ids do not repeat within a row. A row that sees no key gets o = 0,
lse = +inf and zero gradients.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from attn.common import alloc
from attn.common.checks import check_bwd_buffers, check_qkv
from attn.common.jit import LN2, LOG2E, LOG2E_F, cvt, mma
from attn.common.launch import dot_precision, reg_cap, use_tma
from attn.common.softmax import bwd_delta, softmax_step
from attn.dispatch import INTERPRET
from attn.nsa.gate_mix import mix_rows
from attn.nsa.slc_dkdv import dkdv
from attn.nsa.union import tile_unions


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
               OC, OW, GATES, OMIX, tile, n_tiles, pid_bh, scale, qk_scale, q_offset, Tq, Tk, NB,
               HQ: tl.constexpr, HKV: tl.constexpr, HEAD_DIM: tl.constexpr,
               NSEL: tl.constexpr, NSEL_P: tl.constexpr, GROUP_P: tl.constexpr,
               QPP: tl.constexpr, BLOCK_N: tl.constexpr, DQ: tl.constexpr,
               USE_UNION: tl.constexpr, DOT_PREC: tl.constexpr, ACC: tl.constexpr,
               TMA: tl.constexpr, MIX: tl.constexpr):
    """One tile: QPP positions from tile·QPP of (batch, KV head) pid_bh; its union list is row
    pid_bh·n_tiles + tile of UNION / USTART / UEND / UCNT. ACC (dQ only): add to the dQ rows
    already in O instead of overwriting them. MIX (forward only; 0: off): also write the layer's
    gated sum of the rows' MIX branch outputs to OMIX (o_cmp in OC, o_swa in OW when MIX = 3,
    [B, Tq, Hq, D]; GATES [B, Tq, Hq, MIX]; gate_mix.mix_rows) with o_slc as stored."""
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
        o_slc = cvt(acc, O.dtype.element_ty)
        tl.store(o_ptrs, o_slc, mask=m_ok[:, None])
        tl.store(LSE + r_off, tl.where(bad, float("nan"), lse), mask=m_ok)
        if MIX != 0:
            grow = (b.to(tl.int64) * Tq + rows) * HQ + h           # row of GATES [.., MIX]
            o_cmp = tl.load(OC + q_off[:, None] + offs_d[None, :], mask=m_ok[:, None],
                            other=0.0).to(tl.float32)
            o_slc32 = o_slc.to(tl.float32)
            o_swa = o_slc32  # MIX = 2 (no window branch): not read
            if MIX == 3:
                o_swa = tl.load(OW + q_off[:, None] + offs_d[None, :], mask=m_ok[:, None],
                                other=0.0).to(tl.float32)
            o = mix_rows(o_cmp, o_slc32, o_swa, GATES, grow, m_ok, MIX)
            tl.store(OMIX + q_off[:, None] + offs_d[None, :], cvt(o, OMIX.dtype.element_ty),
                     mask=m_ok[:, None])


@triton.jit
def _rows_kernel(Q, K, V, O, LSE, DO, DELTA, SEL, BLK_START, BLK_END, UNION, USTART, UEND, UCNT,
                 OC, OW, GATES, OMIX, FINE, n_tiles, n_coarse, scale, qk_scale, q_offset, Tq, Tk,
                 NB,
                 HQ: tl.constexpr, HKV: tl.constexpr, HEAD_DIM: tl.constexpr,
                 NSEL: tl.constexpr, NSEL_P: tl.constexpr, GROUP_P: tl.constexpr,
                 QPP: tl.constexpr, BLOCK_N: tl.constexpr, DQ: tl.constexpr,
                 USE_UNION: tl.constexpr, DOT_PREC: tl.constexpr, TILES: tl.constexpr,
                 PER: tl.constexpr, SUB: tl.constexpr, ACC: tl.constexpr, TMA: tl.constexpr,
                 MIX: tl.constexpr):
    """DQ=False: forward, writes O and LSE (MIX != 0: and the gated sum into OMIX, _tile_rows).
    DQ=True: reads LSE, DO, DELTA, writes dQ into O (ACC: adds it to what O holds).
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
                       UCNT, OC, OW, GATES, OMIX, tile, n_tiles, pid_bh, scale, qk_scale,
                       q_offset, Tq, Tk, NB, HQ, HKV, HEAD_DIM, NSEL, NSEL_P, GROUP_P, QPP,
                       BLOCK_N, DQ, USE_UNION, DOT_PREC, ACC, TMA, MIX)


# ---------------------------------------------------------------------------------------------
# launch

_HEAD_DIMS = (16, 32, 64, 128)
MAX_NSEL = 32
MAX_GROUP = 64
MAX_SEL_BLOCK = 128
# Launch constants: the sweeps' fastest (docs/nsa_notes.md, "Selected-branch launch").
# Tile rows of the forward / dQ: FWD_ROWS (position, head) rows; 64 (wgmma-sized) pays off when
# neighbouring queries share their picks, as a trained model's do
FWD_ROWS, FWD_WARPS = 64, 4
# Adaptive tiles (TILES = "adaptive"): each coarse tile of FWD_ROWS rows goes to the coarse or
# to the fine launch (FINE_ROWS-row tiles: one position x 16 heads at group 16), whichever does
# less work by the union counts: fine when COARSE_STEP_COST·U_coarse > FINE_STEP_COST·ΣU_fine
# (a fine block step costs about 2/3 of a coarse one). "coarse" / "fine" force one tiling
# (NSA_SLC_TILES=coarse|fine; tests, sweeps). Groups with equal tilings (G >= 64) or without
# union lists for the coarse tiles (G <= 2) take the coarse tiling.
TILES = os.environ.get("NSA_SLC_TILES", "adaptive")
# K/V block tiles through TMA tensor descriptors made on the host, once per launch (use_tma:
# Hopper, alignment, FLASH_TMA; NSA_SLC_TMA=0 turns it off here alone): the forward's only,
# the dQ is faster with pointer loads
TMA = {"fwd": os.environ.get("NSA_SLC_TMA", "1") != "0", "dq": False}
FINE_ROWS = 16
COARSE_STEP_COST, FINE_STEP_COST = 3, 2
# pipeline depth of the fine tiles' loops: 3 stages keep three programs per SM under the dQ's
# register cap (below)
FINE_FWD_STAGES, FINE_DQ_STAGES = 3, 3
# pipeline depth of the union loop: the dQ tile with deeper pipelines loses occupancy
FWD_STAGES, DQ_STAGES = 3, 1
DQ_WARPS = FWD_WARPS
# registers per thread of the dQ launches (the forward's take the compiler's choice): at 168
# three coarse dQ programs fit an SM (40 bytes spill) instead of two
DQ_MAXNREG = 168
# union lists (tile_unions) up to U = QPP·NSEL_P ids per tile: the O(U²) comparisons of
# _union_kernel outgrow the gain beyond; larger tiles (groups of 1-2 heads) search the next id
MAX_UNION = 256


def _check(q, k, v, sel, blk_start, blk_end, scale, sel_block, q_offset):
    """Validate the inputs (ValueError naming the rule); returns the scale as a float."""
    check_qkv("slc_attn", q, k, v, max_group=MAX_GROUP, q_offset=q_offset, head_dims=_HEAD_DIMS,
              contiguous=True)
    B, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    if not isinstance(sel, torch.Tensor) or sel.dim() != 4:
        raise ValueError(f"slc_attn: sel must be a 4-D tensor, got "
                         f"{getattr(sel, 'shape', type(sel))}")
    nsel = sel.shape[-1]
    if sel.dtype != torch.int32 or tuple(sel.shape[:3]) != (B, tq, hkv) \
            or not 1 <= nsel <= MAX_NSEL:
        raise ValueError(f"slc_attn: sel ({sel.dtype}, {tuple(sel.shape)}) must be int32 "
                         f"[B, Tq, Hkv, NSEL] = [{B}, {tq}, {hkv}, NSEL] with 1 <= NSEL <= "
                         f"{MAX_NSEL}")
    for name, t in (("blk_start", blk_start), ("blk_end", blk_end)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.dim() != 1 \
                or t.numel() == 0 or t.shape != blk_start.shape:
            raise ValueError(f"slc_attn: {name} must be a non-empty int32 [NB] tensor like "
                             f"blk_start, got {getattr(t, 'dtype', type(t))} "
                             f"{tuple(getattr(t, 'shape', ()))}")
    for name, t in (("sel", sel), ("blk_start", blk_start), ("blk_end", blk_end)):
        if t.device != q.device:
            raise ValueError(f"slc_attn: {name} is on {t.device}, q on {q.device}: one device")
        if not t.is_contiguous():
            raise ValueError(f"slc_attn: {name} must be contiguous (strides {t.stride()}); call "
                             ".contiguous() first")
    if not isinstance(sel_block, int) or not 1 <= sel_block <= MAX_SEL_BLOCK:
        raise ValueError(f"slc_attn: sel_block={sel_block!r} must be an int in "
                         f"[1, {MAX_SEL_BLOCK}]")
    # T·H·D may pass 2^31 (row offsets are int64); the dK/dV inverse index is int32
    if B * tq * hkv * nsel >= 2 ** 31:
        raise ValueError(f"slc_attn: B*Tq*Hkv*NSEL={B * tq * hkv * nsel} must be < 2**31 (the "
                         "dK/dV inverse index stores int32 positions into the selection list)")
    scale = float(d ** -0.5 if scale is None else scale)
    if not scale > 0:
        raise ValueError(f"slc_attn: scale={scale!r} must be > 0")
    if not q.is_cuda:  # value checks: free on CPU, a host sync on CUDA (see the docstring)
        nb = blk_start.numel()
        if bool(((sel < -1) | (sel >= nb)).any()):
            raise ValueError(f"slc_attn: sel holds ids outside [-1, NB) with NB={nb} blocks")
        if int(blk_start[0]) != 0 or int(blk_end[-1]) != tk \
                or not torch.equal(blk_start[1:], blk_end[:-1]) \
                or bool(((blk_end - blk_start) > sel_block).any() | (blk_end <= blk_start).any()):
            raise ValueError(f"slc_attn: blocks [blk_start, blk_end) must tile [0, Tk={tk}) in "
                             f"order (as block_table's do), each of 1 to sel_block={sel_block} "
                             "keys")
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
                QPP=max(1, rows // gp), DOT_PREC=dot_precision(q.dtype))


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
    if not (TMA["dq" if dq_mode else "fwd"] and use_tma("dq", k, v)):
        return k, v, False
    from triton.tools.tensor_descriptor import TensorDescriptor
    B, tk, hkv, d = k.shape
    block = [_block_n(sel_block), d]
    return (TensorDescriptor.from_tensor(k.view(B * tk, hkv * d), block),
            TensorDescriptor.from_tensor(v.view(B * tk, hkv * d), block), True)


def _launch_rows(q, k, v, out, lse, do, delta, sel, blk_start, blk_end, scale, sel_block,
                 q_offset, dq_mode, accumulate=False, mix=None):
    """mix (forward): (o_cmp, o_swa, gates, o) for the gated sum in the epilogue (o_swa None
    without the window branch), or None."""
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
        # skip); the fine dQ is faster one tile per program (docs/nsa_notes.md)
        sub = per if tiles == 2 and not dq_mode else 1
        grid = (triton.cdiv(n_tiles, sub), B * k.shape[2])
        _rows_kernel[grid](q, kt, vt, out, lse, do, delta, sel, blk_start, blk_end,
                           *(unions or (sel,) * 4),
                           *((q,) * 4 if mix is None else
                             (mix[0], mix[0] if mix[1] is None else mix[1], *mix[2:])),
                           sel if flags is None else flags, n_tiles,
                           1 if flags is None else flags.shape[1], scale, scale * LOG2E_F,
                           q_offset, tq, k.shape[1], nb, **meta, BLOCK_N=_block_n(sel_block),
                           DQ=dq_mode, USE_UNION=unions is not None, TILES=tiles,
                           PER=per if tiles == 2 else 1, SUB=sub, ACC=accumulate,
                           TMA=tma, MIX=0 if mix is None else mix[2].shape[-1],
                           num_warps=DQ_WARPS if dq_mode else FWD_WARPS,
                           **reg_cap(DQ_MAXNREG if dq_mode else None),
                           num_stages=1 if INTERPRET else stages)


def slc_attn_fwd(q, k, v, sel, blk_start, blk_end, *, scale, sel_block, q_offset=0, mix=None):
    """Forward primitive (no autograd): (o [B, Tq, Hq, D] in q's dtype, lse [B, Hq, Tq] fp32,
    natural log). mix = (o_cmp, o_swa, gates) (NSA's other branch outputs and its gates
    [B, Tq, Hq, 3], contiguous; o_swa None and gates [.., 2] without the window branch): also
    the layer's output Σ gates·(o_cmp, o, o_swa) (gate_mix.mix_rows), computed in the epilogue:
    (o, lse, mixed)."""
    scale = _check(q, k, v, sel, blk_start, blk_end, scale, sel_block, q_offset)
    B, tq, hq, _ = q.shape
    o = alloc.empty(q.shape, q.dtype, q.device)
    lse = alloc.empty((B, hq, tq), torch.float32, q.device)
    mixed = None if mix is None else alloc.empty(q.shape, q.dtype, q.device)
    _launch_rows(q, k, v, o, lse, q, lse, sel, blk_start, blk_end, scale, sel_block, q_offset,
                 False, mix=None if mix is None else (*mix, mixed))
    return (o, lse) if mix is None else (o, lse, mixed)


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
    check_bwd_buffers(q, delta, dq, "slc_attn_bwd: ")
    if delta is None:
        delta = bwd_delta(o, do)
    accumulate = dq is not None
    if dq is None:
        dq = alloc.empty(q.shape, q.dtype, q.device)
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
