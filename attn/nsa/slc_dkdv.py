"""dK/dV of NSA's selected-block branch (attn/nsa/slc.py holds the forward, dQ and the
definitions: masking, log2-domain scores, the block contract).

Memory plan
  inverse index (torch: stable sort, searchsorted; deterministic, no host sync): ENTRIES int32
      = the query rows that selected block j of (batch, KV head) bh, ascending, at
      ENTRIES[ROWPTR[bh·NB + j] : ROWPTR[bh·NB + j + 1]].
  _dkdv_kernel: one program = one work item (a block of one (batch, KV head), or one split of
      it); K, V tile [BLOCK_N, D] and fp32 dK, dV [BLOCK_N, D] in registers; streams the gathered
      rows RB at a time, stacking (row, head) pairs as M = RB·GP: Q, dO [M, D] (the G heads of a
      row are contiguous in memory), lse, delta [M]. Writes dK, dV once, or an fp32 partial.
  _reduce_kernel: for split blocks, sums their partials in split order and writes dK, dV.
Load balance of dK/dV: block 0 of a document is selected by every query of the document (the
two most recent blocks by ~2·sel_block queries each), so its row list is the longest. A block
with cnt rows is cut into n = max(1, cnt // SPLIT) splits (SPLIT = max(SPLIT_MIN_ROWS,
SPLIT_FACTOR · Tq·NSEL/NB), i.e. a few times the mean list length), each program doing at most
2·SPLIT rows × G heads; work items are sorted by size, largest first, so the heavy ones start
first. The fp32 partials take at most B·Hkv·⌊Tq·NSEL/SPLIT⌋ ≤ B·Hkv·NB/SPLIT_FACTOR tiles
[BLOCK_N, D] each for dK and dV (the grid and this buffer are sized from that bound on the host:
no device sync). What still limits balance: the largest split (2·SPLIT rows) against the mean.
Deterministic: no atomics, every output element has one writer, partials summed in order.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from attn.common import alloc
from attn.common.jit import LOG2E, LOG2E_F, cvt, mma
from attn.common.launch import dot_precision
from attn.dispatch import INTERPRET


@triton.jit
def _dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, PDK, PDV, ROWPTR, ENTRIES, ITEM, ISPLIT,
                 NSPLIT, PSLOT, BLK_START, BLK_END, scale, qk_scale, q_offset, Tq, Tk, NB, NBH,
                 HQ: tl.constexpr, HKV: tl.constexpr, HEAD_DIM: tl.constexpr,
                 GROUP_P: tl.constexpr, RB: tl.constexpr, BLOCK_N: tl.constexpr,
                 DOT_PREC: tl.constexpr):
    item = tl.load(ITEM + tl.program_id(0))                 # bh·NB + j, or NBH: no work
    if item < NBH:
        bh = item // NB
        j = item % NB
        b = bh // HKV
        hkv = bh % HKV
        GROUP: tl.constexpr = HQ // HKV
        M: tl.constexpr = RB * GROUP_P
        STRIDE_QT: tl.constexpr = HQ * HEAD_DIM
        STRIDE_KT: tl.constexpr = HKV * HEAD_DIM
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        offs_m = tl.arange(0, M)
        r = offs_m // GROUP_P
        g = offs_m % GROUP_P
        h = hkv * GROUP + g
        # this program's share [lo, hi) of the block's row list, RB-aligned
        split = tl.load(ISPLIT + tl.program_id(0))
        n_split = tl.load(NSPLIT + item)
        beg = tl.load(ROWPTR + item)
        cnt = tl.load(ROWPTR + item + 1) - beg
        step = tl.cdiv(tl.cdiv(cnt, n_split), RB) * RB
        lo = split * step
        hi = tl.minimum(lo + step, cnt)
        bs = tl.load(BLK_START + j)
        be = tl.load(BLK_END + j)
        kpos = bs + offs_n
        k_ok = kpos < be
        kv_off = (b.to(tl.int64) * Tk + kpos[:, None]) * STRIDE_KT + hkv * HEAD_DIM \
            + offs_d[None, :]
        k = tl.load(K + kv_off, mask=k_ok[:, None], other=0.0)
        v = tl.load(V + kv_off, mask=k_ok[:, None], other=0.0)
        dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        for i0 in range(lo, hi, RB):
            e_ok = (i0 + r < hi) & (g < GROUP)
            rows = tl.load(ENTRIES + beg + i0 + r, mask=e_ok, other=0)
            q_off = (b.to(tl.int64) * Tq + rows) * STRIDE_QT + h * HEAD_DIM
            q = tl.load(Q + q_off[:, None] + offs_d[None, :], mask=e_ok[:, None], other=0.0)
            do = tl.load(DO + q_off[:, None] + offs_d[None, :], mask=e_ok[:, None], other=0.0)
            r_off = (b * HQ + h).to(tl.int64) * Tq + rows
            lse2 = tl.load(LSE + r_off, mask=e_ok, other=0.0) * LOG2E
            delta = tl.load(DELTA + r_off, mask=e_ok, other=0.0)
            # transposed scores [BLOCK_N, M]: Pᵀ comes out ready for dV = Pᵀ dO
            s_t = mma(k, tl.trans(q), None, DOT_PREC) * qk_scale
            ok = k_ok[:, None] & e_ok[None, :] & (kpos[:, None] <= (q_offset + rows)[None, :])
            p_t = tl.where(ok, tl.math.exp2(s_t - lse2[None, :]), 0.0)
            dv = mma(cvt(p_t, do.dtype), do, dv, DOT_PREC)
            dp_t = mma(v, tl.trans(do), None, DOT_PREC)
            ds_t = p_t * (dp_t - delta[None, :])
            dk = mma(cvt(ds_t, q.dtype), q, dk, DOT_PREC)
        if be - bs > BLOCK_N:  # broken contract (block longer than the tile): loud, not silent
            dk = dk + float("nan")
            dv = dv + float("nan")
        if n_split == 1:
            tl.store(DK + kv_off, cvt(dk * scale, DK.dtype.element_ty), mask=k_ok[:, None])
            tl.store(DV + kv_off, cvt(dv, DV.dtype.element_ty), mask=k_ok[:, None])
        else:
            p_off = ((tl.load(PSLOT + item) + split).to(tl.int64) * BLOCK_N
                     + offs_n[:, None]) * HEAD_DIM + offs_d[None, :]
            tl.store(PDK + p_off, dk)
            tl.store(PDV + p_off, dv)


@triton.jit
def _reduce_kernel(PDK, PDV, DK, DV, NSPLIT, PSLOT, BLK_START, BLK_END, scale, Tk, NB,
                   HKV: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    item = tl.program_id(0)
    n_split = tl.load(NSPLIT + item)
    if n_split > 1:
        bh = item // NB
        j = item % NB
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        slot0 = tl.load(PSLOT + item)
        dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        for i in range(n_split):  # in split order: deterministic
            p_off = ((slot0 + i).to(tl.int64) * BLOCK_N + offs_n[:, None]) * HEAD_DIM \
                + offs_d[None, :]
            dk += tl.load(PDK + p_off)
            dv += tl.load(PDV + p_off)
        bs = tl.load(BLK_START + j)
        kpos = bs + offs_n
        k_ok = kpos < tl.load(BLK_END + j)
        kv_off = ((bh // HKV).to(tl.int64) * Tk + kpos[:, None]) * (HKV * HEAD_DIM) \
            + (bh % HKV) * HEAD_DIM + offs_d[None, :]
        tl.store(DK + kv_off, cvt(dk * scale, DK.dtype.element_ty), mask=k_ok[:, None])
        tl.store(DV + kv_off, cvt(dv, DV.dtype.element_ty), mask=k_ok[:, None])


# Launch constants: the sweeps' fastest (docs/nsa_notes.md, "Selected-branch dK/dV").
# Tile rows DKDV_ROWS (row, head) pairs, halved with one stage for tiles past bf16 64 x 128 (fp32
# or sel_block > 64: the K, V, dK, dV tiles take more registers)
DKDV_ROWS, DKDV_WARPS, DKDV_STAGES = 64, 4, 2
# dK/dV split threshold SPLIT = max(SPLIT_MIN_ROWS, SPLIT_FACTOR · mean rows per block): a few
# times the mean list length; the interpreter splits much more, to exercise the path
SPLIT_MIN_ROWS = 4 if INTERPRET else 256
SPLIT_FACTOR = 1 if INTERPRET else 4


def inverse_index(sel, nb: int):
    """(ROWPTR int32 [B·Hkv·NB + 1], ENTRIES int32, counts int64 [B·Hkv·NB]): the query rows of
    (batch, KV head) bh that selected block j, ascending, are
    ENTRIES[ROWPTR[bh·NB + j] : ROWPTR[bh·NB + j + 1]]. Stable sort: deterministic."""
    B, tq, hkv, _ = sel.shape
    dev = sel.device
    nbh = B * hkv * nb
    bh = torch.arange(B, device=dev)[:, None] * hkv + torch.arange(hkv, device=dev)
    bh = bh[:, None, :, None]                                # [B, 1, Hkv, 1]
    ok = (sel >= 0) & (sel < nb)
    key = torch.where(ok, bh.to(torch.int32) * nb + sel, nbh).flatten()  # empty slots sort last
    sorted_key, order = torch.sort(key, stable=True)
    rows = torch.arange(tq, device=dev, dtype=torch.int32)[None, :, None, None].expand(sel.shape)
    # each list starts at its key's first place in the sorted keys (a search, not bincount: that
    # reads the largest key back to the host, a sync that idles the GPU mid-backward)
    rowptr = torch.searchsorted(sorted_key, torch.arange(nbh + 1, device=dev,
                                                         dtype=sorted_key.dtype))
    counts = (rowptr[1:] - rowptr[:-1]).to(torch.int64)
    return rowptr.to(torch.int32), rows.flatten()[order].contiguous(), counts


def split_rows(tq: int, nsel: int, nb: int) -> int:
    """Row-list length beyond which a block's dK/dV is split over several programs."""
    return max(SPLIT_MIN_ROWS, SPLIT_FACTOR * triton.cdiv(tq * nsel, nb))


def work_items(counts, split: int, n_items: int):
    """The dK/dV work list, sized n_items (host bound, no sync): (ITEM, ISPLIT) int32 [n_items]
    (global block bh·NB + j and split index per program, largest splits first, unused programs
    ITEM = B·Hkv·NB last), NSPLIT, PSLOT int32 [B·Hkv·NB] (splits per block; first partial tile
    of a split block)."""
    nbh = counts.numel()
    n = torch.clamp(counts // split, min=1)
    ncum = torch.cumsum(n, 0)
    idx = torch.arange(n_items, device=counts.device)
    owner = torch.searchsorted(ncum, idx, right=True)        # == nbh past the last split
    own = owner.clamp(max=nbh - 1)
    sub = idx - (ncum[own] - n[own])
    size = torch.where(owner < nbh, counts[own] // n[own], -1)
    order = torch.sort(size, descending=True, stable=True).indices
    multi = torch.where(n > 1, n, 0)
    pslot = torch.cumsum(multi, 0) - multi
    i32 = lambda t: t.to(torch.int32).contiguous()  # noqa: E731
    return i32(owner[order]), i32(sub[order]), i32(n), i32(pslot)


def dkdv(q, k, v, do, lse, delta, sel, blk_start, blk_end, scale, q_offset, bn):
    """(dk, dv) shaped like k, v, given dO, the forward's lse and delta = rowsum(O ⊙ dO)
    (arguments checked by slc.slc_attn_bwd; bn: the key tile, ≥ sel_block)."""
    B, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    nb, nsel = blk_start.numel(), sel.shape[-1]
    rowptr, entries, counts = inverse_index(sel, nb)
    split = split_rows(tq, nsel, nb)
    n_part = B * hkv * (tq * nsel // split)                  # bound on partial tiles
    item, isplit, nsplit, pslot = work_items(counts, split, B * hkv * nb + n_part)
    pdk = alloc.empty((max(n_part, 1), bn, d), torch.float32, q.device)
    pdv = alloc.empty((max(n_part, 1), bn, d), torch.float32, q.device)
    dk = alloc.empty(k.shape, k.dtype, k.device)
    dv = alloc.empty(v.shape, v.dtype, v.device)
    gp = triton.next_power_of_2(hq // hkv)
    big = bn * d * q.element_size() > 64 * 128 * 2                 # tiles past bf16 64 x 128
    rows, stages = (DKDV_ROWS // 2, 1) if big else (DKDV_ROWS, DKDV_STAGES)
    _dkdv_kernel[(item.numel(),)](
        q, k, v, do, lse, delta, dk, dv, pdk, pdv, rowptr, entries, item, isplit, nsplit, pslot,
        blk_start, blk_end, scale, scale * LOG2E_F, q_offset, tq, tk, nb, B * hkv * nb, HQ=hq,
        HKV=hkv,
        HEAD_DIM=d, GROUP_P=gp, RB=max(1, rows // gp), BLOCK_N=bn,
        DOT_PREC=dot_precision(q.dtype), num_warps=DKDV_WARPS, num_stages=stages)
    _reduce_kernel[(B * hkv * nb,)](pdk, pdv, dk, dv, nsplit, pslot, blk_start, blk_end, scale,
                                    tk, nb, HKV=hkv, HEAD_DIM=d, BLOCK_N=bn, num_warps=4)
    return dk, dv
