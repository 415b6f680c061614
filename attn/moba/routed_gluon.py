"""MoBA's routed forward in Gluon for Hopper (sm_90): routed.py's _routed_fwd_kernel as the
flash forward's warp-specialized partitions (attn/flash/fwd_gluon.py), under MOBA_ROUTED_IMPL
(routed.py). The consumers gather their query rows themselves (Hopper's TMA loads boxes, it
cannot gather rows); the producer streams the block's K, V by TMA.

One program = 128 entries of one (batch·query head, block): the routed.py inverse index lists
per (bh, block j) the entries e = row·NSEL + slot that chose j (ENTRIES[ROWPTR[bh·NB + j] ..]),
and WORK maps program p to its (group bh·NB + j, chunk c) (work_list: the chunks of all groups
in group order, so neighbouring programs share a block's K, V in L2; programs past the last
chunk exit). Partitions:
  consumer 0 (default, 4 warps) : entries 0..63 of the chunk
  consumer 1 (worker, 4 warps)  : entries 64..127
  producer   (worker, 1 warp)   : TMA loads of the block's K/V tiles into the ring (fwd_gluon)
Each consumer loads its entries, gathers their Q rows into registers and shared memory (16-byte
pieces), then runs the flash forward's steps over the block's key tiles (fwd_gluon.fwd_step: the
softmax of tile j overlapping the P·V product of tile j − 1) without masks (the block lies
wholly before its routed rows, and is complete). Entries past the group's count gather row 0
and are not stored. Output per entry, as routed.py's: the normalised partial output
OP [B·Hq, Tq·NSEL, D] (through the Q tile in shared memory, then row stores) and its log2-domain
lse LP [B·Hq, Tq·NSEL].

Scope (routed_scope_error): fwd_gluon.scope_error's (Hopper, bf16 / fp16, D 64 / 128), no
documents, block_size a multiple of 128.
"""
from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier,
                                                              warpgroup_mma, warpgroup_mma_wait)

from attn.flash.fwd_gluon import (CONSUMER_REGS, CONSUMER_WARPS, HALF_M, PRODUCER_REGS, cta_sync,
                                  fwd_step, kv_producer, mma_layout, online_softmax, scope_error,
                                  tile_desc)

TILE = 128     # entries per program, keys per tile; block_size must be a multiple of it
STAGES = 3     # K/V ring: Q 2 x 64 x D + 3 x (K, V) 128 x D = 224 KB at D = 128 (fwd_gluon's)


@gluon.jit
def _gather_q(Q, ENTRIES, first, cnt, q_smem, Tq, hq, h, b, nsel, rows_l: gl.constexpr):
    """The Q rows of this consumer's 64 entries ENTRIES[first ..] (valid below cnt; the others
    take row 0) into q_smem."""
    HEAD_DIM: gl.constexpr = q_smem.shape[1]
    i = gl.arange(0, HALF_M, layout=gl.SliceLayout(1, rows_l))
    rows = gl.load(ENTRIES + first + i, mask=i < cnt, other=0) // nsel
    cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, rows_l))
    # int64 row offsets: Tq·Hq·D may pass 2^31
    offs = ((b * Tq).to(gl.int64) + rows)[:, None] * (hq * HEAD_DIM) + h * HEAD_DIM + cols[None, :]
    q_smem.store(gl.load(Q + offs))
    fence_async_shared()   # generic-proxy stores, read by wgmma (async proxy)
    cta_sync()             # every warp of this consumer has stored its rows


@gluon.jit
def _consumer(Q, OP, LP, ENTRIES, q_smem, k_smem, v_smem, k_bar, v_bar, empty, qk_scale, Tq, hq,
              nsel, b, h, bh, first, cnt, j0, n, HALF: gl.constexpr):
    HEAD_DIM: gl.constexpr = q_smem.shape[2]
    BLOCK_N: gl.constexpr = k_smem.shape[1]
    STAGES_: gl.constexpr = k_smem.shape[0]
    s_layout: gl.constexpr = mma_layout(BLOCK_N)
    o_layout: gl.constexpr = mma_layout(HEAD_DIM)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    TPR: gl.constexpr = HEAD_DIM // 8      # 16-byte pieces: HEAD_DIM / 8 threads span a row
    rows_l: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TPR, TPR], [CONSUMER_WARPS, 1], [1, 0])
    q_half = q_smem.index(HALF)
    first = first + HALF * HALF_M          # this consumer's entries
    cnt = cnt - HALF * HALF_M
    _gather_q(Q, ENTRIES, first, cnt, q_half, Tq, hq, h, b, nsel, rows_l)

    # tile j0 (ring slot 0): S and its softmax, no P·V yet; then fwd_gluon's steps, no masks
    # (the scalar 0s stand for the mask arguments they do not read)
    mbarrier.wait(k_bar.index(0), 0)
    s = warpgroup_mma(q_half, k_smem.index(0).permute((1, 0)),
                      gl.zeros([HALF_M, BLOCK_N], gl.float32, s_layout), use_acc=False,
                      is_async=True)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
    m_i = gl.full([HALF_M], -1.0e30, gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([HALF_M], gl.float32, gl.SliceLayout(1, s_layout))
    p, alpha, m_i, l_i = online_softmax(s, m_i, l_i, qk_scale, j0, 0, 0, 0, BLOCK_N, s_layout,
                                        False)
    p16 = gl.convert_layout(p.to(q_half.dtype), p_layout)
    acc = gl.zeros([HALF_M, HEAD_DIM], gl.float32, o_layout)
    for j in range(j0 + 1, n):
        acc, p16, m_i, l_i = fwd_step(j, j0, n, acc, p16, m_i, l_i, q_half, k_smem, v_smem, k_bar,
                                      v_bar, empty, 0, 0, 0, qk_scale, BLOCK_N, STAGES_,
                                      s_layout, p_layout, o_layout, False)
    last = n - 1 - j0
    mbarrier.wait(v_bar.index(last % STAGES_), (last // STAGES_) & 1)
    acc = warpgroup_mma(p16, v_smem.index(last % STAGES_), acc, is_async=True)
    acc, p16 = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p16))

    # O (normalised; every row sees the whole block, so l > 0) through q_half into row stores
    acc = acc / gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))[:, None]
    q_half.store(acc.to(q_half.dtype))     # Q is no longer read (the products were waited for)
    cta_sync()
    i = gl.arange(0, HALF_M, layout=gl.SliceLayout(1, rows_l))
    ok = i < cnt
    e = gl.load(ENTRIES + first + i, mask=ok, other=0).to(gl.int64) + bh * Tq * nsel
    cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, rows_l))
    gl.store(OP + e[:, None] * HEAD_DIM + cols[None, :], q_half.load(rows_l), mask=ok[:, None])
    lse = gl.convert_layout(m_i + gl.log2(l_i), gl.SliceLayout(1, rows_l))
    gl.store(LP + e, lse, mask=ok)


# partition entry points take runtime values only (fwd_gluon.py), one per consumer half
@gluon.jit
def _entries_0_63(Q, OP, LP, ENTRIES, q_smem, k_smem, v_smem, k_bar, v_bar, empty, qk_scale, Tq,
                  hq, nsel, b, h, bh, first, cnt, j0, n):
    _consumer(Q, OP, LP, ENTRIES, q_smem, k_smem, v_smem, k_bar, v_bar, empty, qk_scale, Tq, hq,
              nsel, b, h, bh, first, cnt, j0, n, 0)


@gluon.jit
def _entries_64_127(Q, OP, LP, ENTRIES, q_smem, k_smem, v_smem, k_bar, v_bar, empty, qk_scale,
                    Tq, hq, nsel, b, h, bh, first, cnt, j0, n):
    _consumer(Q, OP, LP, ENTRIES, q_smem, k_smem, v_smem, k_bar, v_bar, empty, qk_scale, Tq, hq,
              nsel, b, h, bh, first, cnt, j0, n, 1)


@gluon.jit
def _routed_fwd_kernel(Q, q_desc, k_desc, v_desc, OP, LP, ENTRIES, ROWPTR, WORK, qk_scale, Tq, Tk,
                       NB, hq, group, nsel, n_work, block_size, HEAD_DIM: gl.constexpr,
                       BLOCK_N: gl.constexpr, STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                       PRODUCER_REGS: gl.constexpr, num_warps: gl.constexpr):
    """q_desc: only the Q tiles' shape, dtype and shared layout (the rows are gathered)."""
    gl.static_assert(num_warps == CONSUMER_WARPS)
    pid = gl.program_id(0)
    grp = gl.load(WORK + pid)              # bh·NB + block, or −1 past the last chunk
    if grp < 0:
        return
    c = gl.load(WORK + n_work + pid)       # the chunk of the group's entries
    bh = grp // NB
    blk = grp % NB
    b = bh // hq
    h = bh % hq
    beg = gl.load(ROWPTR + grp)
    first = beg + c * (2 * HALF_M)
    cnt = gl.load(ROWPTR + grp + 1) - first
    # the block's keys [blk·block_size, +block_size) in tiles j0 .. n − 1 (no documents)
    j0 = blk * (block_size // BLOCK_N)
    n = j0 + block_size // BLOCK_N

    q_smem = gl.allocate_shared_memory(q_desc.dtype, [2, HALF_M, HEAD_DIM], q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
    k_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(k_bar.index(i), count=1)
        mbarrier.init(v_bar.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)   # one arrival per consumer
    fence_async_shared()

    consumer_args = (Q, OP, LP, ENTRIES, q_smem, k_smem, v_smem, k_bar, v_bar, empty, qk_scale,
                     Tq, hq, nsel, b, h, bh, first, cnt, j0, n)
    gl.warp_specialize([
        (_entries_0_63, consumer_args),
        (_entries_64_127, consumer_args),
        (kv_producer, (k_desc, v_desc, k_smem, v_smem, k_bar, v_bar, empty, b * Tk,
                       (h // group) * HEAD_DIM, j0, n)),
    ], [CONSUMER_WARPS, 1], [CONSUMER_REGS, PRODUCER_REGS])


# launch

def routed_scope_error(q, k, block_size, has_docs: bool) -> str | None:
    """Why the Gluon routed forward cannot run these inputs, or None."""
    why = scope_error(q, k)
    if why is not None:
        return why.replace("Gluon flash forward", "MoBA Gluon routed forward")
    if has_docs:
        return "the MoBA Gluon routed forward takes no documents (cu_seqlens)"
    if not block_size or block_size % TILE:
        return f"the MoBA Gluon routed forward needs block_size a multiple of {TILE}; got " \
               f"block_size={block_size}"
    return None


def work_list(rowptr, n_work: int):
    """WORK int32 [2, n_work]: for program p, its group bh·NB + block (−1 past the last chunk)
    and chunk; the chunks of every group in group order. n_work bounds the chunk count (no host
    sync): Σ ceil(cnt / TILE) <= Σ cnt / TILE + groups."""
    cnt = (rowptr[1:] - rowptr[:-1]).long()
    chunks = (cnt + TILE - 1) // TILE
    ends = torch.cumsum(chunks, 0)
    p = torch.arange(n_work, device=rowptr.device)
    grp = torch.searchsorted(ends, p, right=True)
    inside = grp < chunks.numel()
    grp_c = grp.clamp(max=chunks.numel() - 1)
    chunk = p - (ends - chunks)[grp_c]
    return torch.stack([torch.where(inside, grp_c, -1), chunk]).to(torch.int32)


def routed_fwd_gluon(q, k, v, index, nb: int, nsel: int, scale_log2: float, block_size: int,
                     op, lp):
    """routed.routed_fwd's (OP, LP) written into op, lp through the Gluon kernel; ValueError
    outside its scope (documents are the caller's to rule out: it passes the block table's nb
    blocks of block_size keys from 0)."""
    why = routed_scope_error(q, k, block_size, False)
    if why is not None:
        raise ValueError(why)
    B, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    rowptr, entries = index
    n_work = triton.cdiv(B * hq * tq * nsel, TILE) + B * hq * nb
    work = work_list(rowptr, n_work)
    _routed_fwd_kernel[(n_work,)](
        q, tile_desc(q, HALF_M.value), tile_desc(k, TILE), tile_desc(v, TILE), op, lp, entries,
        rowptr, work, scale_log2, tq, tk, nb, hq, hq // hkv, nsel, n_work, block_size,
        HEAD_DIM=d, BLOCK_N=TILE, STAGES=STAGES, CONSUMER_REGS=CONSUMER_REGS,
        PRODUCER_REGS=PRODUCER_REGS, num_warps=CONSUMER_WARPS)
    return op, lp
