"""MoBA dK/dV in Gluon for Hopper (sm_90): the flash dK/dV kernel's partitions
(attn/flash/bwd_gluon.py) over MoBA's rows, with a producer that gathers the routed rows by
cp.async (Hopper's TMA loads boxes, it cannot gather rows). Under MOBA_DKDV_IMPL (bwd.py); the dQ
kernels stay fwd.py's and routed.py's.

One program = 128 keys of one (batch, KV head), inside one block (block_size a multiple of 128).
For every query head of the GQA group it walks
  (a) the own-block rows: positions from the tile's first key to the block's end, BLOCK_M at a
      time (a row sees the keys of its block at or before it);
  (b) the routed rows of the block: the inverse index (routed.py) lists, per (batch, query head,
      block), the entries row·NSEL + slot that chose it (ROWS: their rows, divided once on the
      host); BLOCK_M at a time, every row sees every key of the (earlier, complete) block.
Partitions (bwd_gluon.py's): two consumer warpgroups of 64 keys each (K, V in shared memory,
dK, dV [64, D] fp32 in registers, the same per-block step), a producer of PRODUCER_WARPS warps
that fills the stage ring: per block, Q and dO [BLOCK_M, D] and the rows' lse and delta
[BLOCK_M] fp32, by cp.async, SUB_M rows per warp at a time (its 24 registers hold one
sub-tile's addresses). Routed row ids come with one load per block, a block ahead, staged
through shared memory into the copy layout, so no copy waits on a load. Each producer thread
then arms a cp.async arrive on the stage's `ready` barrier (it lands once that thread's copies
have), and one elected arrive makes up the barrier's count of 1. cp.async writes through the
generic proxy and wgmma reads through the async proxy: each consumer fences after its barrier
wait. Shared memory: K, V 128 x D, STAGES x (Q, dO) BLOCK_M x D (16-bit) and (lse, delta)
BLOCK_M (fp32): 194 KB at D = 128 (64, 4 stages).

Masking: own rows at a position before a key give P = 0 (blocks holding such rows are masked,
later ones whole); the padding rows of a block's last routed chunk are zeros in the stage
(_fill), which adds exactly 0 to dK and dV without a mask.

Scope (dkdv_scope_error): fwd_gluon.scope_error's (Hopper, bf16 / fp16, D 64 / 128), no
documents, q_offset 0 and Tq == Tk (no CP shard), block_size and Tk multiples of 128.
Deterministic: every dK, dV element has one writer; rows are added in a fixed order.
"""
from __future__ import annotations

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                              warpgroup_mma, warpgroup_mma_wait)

from attn.common import alloc
from attn.common.jit import LOG2E_F
from attn.flash.bwd_gluon import DKDV_CFG, HALF_N, LOG2E, dkdv_ring, kv_half
from attn.flash.fwd_gluon import (CONSUMER_REGS, CONSUMER_WARPS, PRODUCER_REGS, cta_sync,
                                  mma_layout, scope_error, tile_desc, tma_store)

# cp.async into shared memory (renamed between triton 3.6, the GPU image, and 3.9)
cp_async = async_copy.async_load if hasattr(async_copy, "async_load") \
    else async_copy.async_copy_global_to_shared
SUB_M = gl.constexpr(8)   # rows per producer copy step: 4 (D 128) or 2 (D 64) 16-byte copies
TILE = 128                # keys per program; block_size and Tk multiples of it
# warps of the producer partition, splitting each stage's copies at the same registers (the
# partition is allocated a warpgroup either way): fewer starve the consumers (docs/moba_notes.md)
PRODUCER_WARPS = 4


@gluon.constexpr_function
def row_copy_layout(head_dim, warps):
    """Register layout of [rows, head_dim] 16-bit row copies: 16-byte pieces (8 elements),
    head_dim / 8 threads span a row, the warps stacked along the rows."""
    tpr = head_dim // 8
    return gl.BlockedLayout([1, 8], [32 // tpr, tpr], [warps, 1], [1, 0])


@gluon.jit
def _step(it, dk, dv, k_c, v_c, q_smem, do_smem, lse_smem, delta_smem, ready, empty, rows, kpos,
          qk_scale, BLOCK_M: gl.constexpr, STAGES: gl.constexpr, s_layout: gl.constexpr,
          p_layout: gl.constexpr, MASKED: gl.constexpr):
    """The block in ring slot it: bwd_gluon's step on this consumer's keys, with the rows' lse
    and delta from the stage. MASKED: own rows at positions `rows`, P = 0 where the row is
    before the key."""
    st = it % STAGES
    mbarrier.wait(ready.index(st), (it // STAGES) & 1)
    fence_async_shared()   # the stage was written by cp.async (generic proxy), wgmma reads it
    qs = q_smem.index(st)
    dos = do_smem.index(st)
    s = warpgroup_mma(k_c, qs.permute((1, 0)), gl.zeros([HALF_N, BLOCK_M], gl.float32, s_layout),
                      use_acc=False, is_async=True)
    dp = warpgroup_mma(v_c, dos.permute((1, 0)),
                       gl.zeros([HALF_N, BLOCK_M], gl.float32, s_layout), use_acc=False,
                       is_async=True)
    lse2 = lse_smem.index(st).load(gl.SliceLayout(0, s_layout)) * LOG2E
    delta = delta_smem.index(st).load(gl.SliceLayout(0, s_layout))
    s = warpgroup_mma_wait(num_outstanding=1, deps=(s,))          # Sᵀ done, dPᵀ may run
    p = gl.exp2(s * qk_scale - lse2[None, :])
    if MASKED:
        p = gl.where(rows[None, :] >= kpos[:, None], p, 0.0)   # select: masked scores may overflow
    p16 = gl.convert_layout(p.to(qs.dtype), p_layout)
    dv = warpgroup_mma(p16, dos, dv, is_async=True)
    dp = warpgroup_mma_wait(num_outstanding=1, deps=(dp,))        # dPᵀ done, dV may run
    ds16 = gl.convert_layout((p * (dp - delta[None, :])).to(qs.dtype), p_layout)
    dk = warpgroup_mma(ds16, qs, dk, is_async=True)
    dk, dv, p16, ds16 = warpgroup_mma_wait(num_outstanding=0, deps=(dk, dv, p16, ds16))
    cta_sync()  # every warp of this consumer is done with the stage
    mbarrier.arrive(empty.index(st), count=1)
    return dk, dv


@gluon.jit
def _consumer(k_desc, v_desc, dk_desc, dv_desc, ROWPTR, q_smem, do_smem, lse_smem, delta_smem,
              k_smem, v_smem, kv_bar, ready, empty, qk_scale, scale, hq, group, NB, row_k, k0, col,
              b, hkv, j, m_lo, m_hi, HALF: gl.constexpr):
    HEAD_DIM: gl.constexpr = k_desc.block_type.shape[1]
    BLOCK_M: gl.constexpr = q_smem.shape[1]
    STAGES: gl.constexpr = q_smem.shape[0]
    s_layout: gl.constexpr = mma_layout(BLOCK_M)
    o_layout: gl.constexpr = mma_layout(HEAD_DIM)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    kc = k0 + HALF * HALF_N            # this consumer's first key
    k_c, v_c = kv_half(k_desc, v_desc, k_smem, v_smem, kv_bar, row_k, kc, col, HALF)
    kpos = kc + gl.arange(0, HALF_N, layout=gl.SliceLayout(1, s_layout))
    rel = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, s_layout))
    # own rows: blocks [m_lo, f_lo) hold rows before this consumer's last key (masked), the
    # blocks from f_lo on see all of its keys
    f_lo = gl.minimum(gl.maximum(gl.cdiv(kc + HALF_N - 1, BLOCK_M), m_lo), m_hi)

    dk = gl.zeros([HALF_N, HEAD_DIM], gl.float32, o_layout)
    dv = gl.zeros([HALF_N, HEAD_DIM], gl.float32, o_layout)
    it = m_lo * 0
    for g in range(group):             # the producer's order: heads, own rows, routed rows
        bh = (b * hq + hkv * group + g).to(gl.int64)
        for i in range(m_lo, f_lo):
            dk, dv = _step(it, dk, dv, k_c, v_c, q_smem, do_smem, lse_smem, delta_smem, ready,
                           empty, i * BLOCK_M + rel, kpos, qk_scale, BLOCK_M, STAGES, s_layout,
                           p_layout, True)
            it += 1
        for i in range(f_lo, m_hi):
            dk, dv = _step(it, dk, dv, k_c, v_c, q_smem, do_smem, lse_smem, delta_smem, ready,
                           empty, rel, kpos, qk_scale, BLOCK_M, STAGES, s_layout, p_layout, False)
            it += 1
        cnt = gl.load(ROWPTR + bh * NB + j + 1) - gl.load(ROWPTR + bh * NB + j)
        for c in range(0, gl.cdiv(cnt, BLOCK_M)):
            dk, dv = _step(it, dk, dv, k_c, v_c, q_smem, do_smem, lse_smem, delta_smem, ready,
                           empty, rel, kpos, qk_scale, BLOCK_M, STAGES, s_layout, p_layout, False)
            it += 1

    # K and V are no longer read: their tiles stage dK (scaled) and dV for the TMA stores
    k_c.store((dk * scale).to(k_c.dtype))
    v_c.store(dv.to(v_c.dtype))
    fence_async_shared()
    tma_store(dk_desc, [row_k + kc, col], k_c)
    tma_store(dv_desc, [row_k + kc, col], v_c)
    tma.store_wait(pendings=0)


# partition entry points take runtime values only (bwd_gluon.py), one per consumer half
@gluon.jit
def _consumer_keys_0_63(k_desc, v_desc, dk_desc, dv_desc, ROWPTR, q_smem, do_smem, lse_smem,
                        delta_smem, k_smem, v_smem, kv_bar, ready, empty, qk_scale, scale, hq,
                        group, NB, row_k, k0, col, b, hkv, j, m_lo, m_hi):
    _consumer(k_desc, v_desc, dk_desc, dv_desc, ROWPTR, q_smem, do_smem, lse_smem, delta_smem,
              k_smem, v_smem, kv_bar, ready, empty, qk_scale, scale, hq, group, NB, row_k, k0, col,
              b, hkv, j, m_lo, m_hi, 0)


@gluon.jit
def _consumer_keys_64_127(k_desc, v_desc, dk_desc, dv_desc, ROWPTR, q_smem, do_smem, lse_smem,
                          delta_smem, k_smem, v_smem, kv_bar, ready, empty, qk_scale, scale, hq,
                          group, NB, row_k, k0, col, b, hkv, j, m_lo, m_hi):
    _consumer(k_desc, v_desc, dk_desc, dv_desc, ROWPTR, q_smem, do_smem, lse_smem, delta_smem,
              k_smem, v_smem, kv_bar, ready, empty, qk_scale, scale, hq, group, NB, row_k, k0, col,
              b, hkv, j, m_lo, m_hi, 1)


@gluon.jit
def _fill(Q_h, DO_h, LSE_h, DELTA_h, ids, ids_smem, first, cnt, st, q_smem, do_smem, lse_smem,
          delta_smem, ready, stride_t, GATHER: gl.constexpr):
    """One stage: BLOCK_M rows (GATHER: the row ids `ids`, loaded a stage ahead, of which those
    at or past cnt are padding; else the rows first..) copied by cp.async, Q and dO SUB_M rows
    per producer warp at a time (their ids read back from ids_smem in the copy layout), lse and
    delta per row. Padding rows copy nothing, so the stage holds zeros there (cp.async's zero
    fill): they give P·dO = 0 (dO = 0) and dS = P·(dP − delta) = 0 (dP = 0, delta = 0)."""
    BLOCK_M: gl.constexpr = q_smem.shape[1]
    HEAD_DIM: gl.constexpr = q_smem.shape[2]
    PW: gl.constexpr = gl.num_warps()  # the producer's warps
    STEP: gl.constexpr = SUB_M * PW    # rows per copy step
    tile: gl.constexpr = row_copy_layout(HEAD_DIM, PW)
    SPT: gl.constexpr = BLOCK_M // (32 * PW) if BLOCK_M >= 32 * PW else 1
    line: gl.constexpr = gl.BlockedLayout([SPT], [32], [PW], [0])
    sub = gl.arange(0, STEP, layout=gl.SliceLayout(1, tile))
    cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, tile))
    if GATHER:
        cta_sync()                     # the previous stage's ids are read
        ids_smem.store(ids)
        cta_sync()
    for r0 in gl.static_range(0, BLOCK_M, STEP):
        ok = r0 + sub < cnt
        if GATHER:
            rows = ids_smem.slice(r0, STEP).load(gl.SliceLayout(1, tile))
        else:
            rows = first + r0 + sub
        offs = rows.to(gl.int64)[:, None] * stride_t + cols[None, :]
        cp_async(q_smem.index(st).slice(r0, STEP), Q_h + offs, mask=ok[:, None])
        cp_async(do_smem.index(st).slice(r0, STEP), DO_h + offs, mask=ok[:, None])
    idx = gl.arange(0, BLOCK_M, layout=line)
    if GATHER:
        rows = ids
    else:
        rows = first + idx
    cp_async(lse_smem.index(st), LSE_h + rows, mask=idx < cnt)
    cp_async(delta_smem.index(st), DELTA_h + rows, mask=idx < cnt)
    async_copy.mbarrier_arrive(ready.index(st))   # armed per thread: lands with its copies
    if PW > 1:
        cta_sync()                     # every warp has armed its arrive
    mbarrier.arrive(ready.index(st), count=1)      # the barrier's count of 1 (elected thread)


@gluon.jit
def _producer(Q, DO, LSE, DELTA, ROWPTR, ROWS, q_smem, do_smem, lse_smem, delta_smem, ready,
              empty, Tq, hq, group, NB, b, hkv, j, m_lo, m_hi):
    """Fills the ring in the consumers' order: per query head of the group, the own rows'
    blocks [m_lo, m_hi), then the block's routed rows BLOCK_M at a time, their ids loaded one
    stage ahead (so the copies wait on no load)."""
    BLOCK_M: gl.constexpr = q_smem.shape[1]
    HEAD_DIM: gl.constexpr = q_smem.shape[2]
    STAGES: gl.constexpr = q_smem.shape[0]
    PW: gl.constexpr = gl.num_warps()
    SPT: gl.constexpr = BLOCK_M // (32 * PW) if BLOCK_M >= 32 * PW else 1
    line: gl.constexpr = gl.BlockedLayout([SPT], [32], [PW], [0])
    ids_smem = gl.allocate_shared_memory(gl.int32, [BLOCK_M], gl.SwizzledSharedLayout(1, 1, 1,
                                                                                      [0]))
    idx = gl.arange(0, BLOCK_M, layout=line)
    stride_t = hq * HEAD_DIM
    it = m_lo * 0
    for g in range(group):
        h = hkv * group + g
        bh = (b * hq + h).to(gl.int64)
        base = b.to(gl.int64) * Tq * stride_t + h * HEAD_DIM
        beg = gl.load(ROWPTR + bh * NB + j)
        cnt = gl.load(ROWPTR + bh * NB + j + 1) - beg
        ids_next = gl.load(ROWS + beg + idx, mask=idx < cnt, other=0)
        for i in range(m_lo, m_hi):
            st = it % STAGES
            # the stage's previous block (it − STAGES) must have been released by both consumers
            mbarrier.wait(empty.index(st), ((it // STAGES) + 1) & 1, pred=it >= STAGES)
            _fill(Q + base, DO + base, LSE + bh * Tq, DELTA + bh * Tq, ids_next, ids_smem,
                  i * BLOCK_M, BLOCK_M, st, q_smem, do_smem, lse_smem, delta_smem, ready,
                  stride_t, False)
            it += 1
        for c in range(0, gl.cdiv(cnt, BLOCK_M)):
            ids = ids_next
            nxt = (c + 1) * BLOCK_M + idx
            ids_next = gl.load(ROWS + beg + nxt, mask=nxt < cnt, other=0)
            st = it % STAGES
            mbarrier.wait(empty.index(st), ((it // STAGES) + 1) & 1, pred=it >= STAGES)
            _fill(Q + base, DO + base, LSE + bh * Tq, DELTA + bh * Tq, ids, ids_smem, 0,
                  cnt - c * BLOCK_M, st, q_smem, do_smem, lse_smem, delta_smem, ready, stride_t,
                  True)
            it += 1


@gluon.jit
def _moba_dkdv_kernel(Q, DO, q_desc, do_desc, k_desc, v_desc, dk_desc, dv_desc, LSE, DELTA,
                      ROWPTR, ROWS, qk_scale, scale, Tq, hq, group, block_size, NB,
                      HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
                      BLOCK_N: gl.constexpr, STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                      PRODUCER_REGS: gl.constexpr, num_warps: gl.constexpr,
                      PRODUCER_WARPS: gl.constexpr = 1):
    """q_desc, do_desc: only the ring's shape, dtype and shared layout (the rows are gathered)."""
    gl.static_assert(BLOCK_N == 2 * HALF_N)
    gl.static_assert(num_warps == CONSUMER_WARPS)
    # (batch, KV head) on axis 0: every head's first key tiles (block 0, chosen by the most
    # rows) launch before any head's later ones
    pid_bh = gl.program_id(0)
    k0 = gl.program_id(1) * BLOCK_N
    hkv_n = hq // group
    b = pid_bh // hkv_n
    hkv = pid_bh % hkv_n
    row_k = b * Tq                     # Tk == Tq: first key row of this batch in [B·T, H·D]
    col = hkv * HEAD_DIM
    j = k0 // block_size
    # own rows: [k0, end of the block), BLOCK_M divides both (multiples of 128)
    m_lo = k0 // BLOCK_M
    m_hi = gl.cdiv(gl.minimum((j + 1) * block_size, Tq), BLOCK_M)

    q_smem, do_smem, k_smem, v_smem, kv_bar, ready, empty = dkdv_ring(q_desc, do_desc, k_desc,
                                                                      v_desc, STAGES)
    rows_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
    lse_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_M], rows_layout)
    delta_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_M], rows_layout)
    consumer_args = (k_desc, v_desc, dk_desc, dv_desc, ROWPTR, q_smem, do_smem, lse_smem,
                     delta_smem, k_smem, v_smem, kv_bar, ready, empty, qk_scale, scale, hq, group,
                     NB, row_k, k0, col, b, hkv, j, m_lo, m_hi)
    gl.warp_specialize([
        (_consumer_keys_0_63, consumer_args),
        (_consumer_keys_64_127, consumer_args),
        (_producer, (Q, DO, LSE, DELTA, ROWPTR, ROWS, q_smem, do_smem, lse_smem, delta_smem,
                     ready, empty, Tq, hq, group, NB, b, hkv, j, m_lo, m_hi)),
    ], [CONSUMER_WARPS, PRODUCER_WARPS], [CONSUMER_REGS, PRODUCER_REGS])


# launch

def dkdv_scope_error(q, k, block_size, has_docs: bool, q_offset: int) -> str | None:
    """Why the MoBA Gluon dK/dV kernel cannot run these inputs, or None."""
    why = scope_error(q, k)
    if why is not None:
        return why.replace("Gluon flash forward", "MoBA Gluon dK/dV kernel")
    tq, tk = q.shape[1], k.shape[1]
    if has_docs or q_offset or tq != tk:
        return "the MoBA Gluon dK/dV kernel takes no documents (cu_seqlens) and no CP shard " \
               f"(q_offset 0, Tq == Tk); got cu_seqlens={'set' if has_docs else None}, " \
               f"q_offset={q_offset}, Tq={tq}, Tk={tk}"
    if not block_size or block_size % TILE or tk % TILE:
        return f"the MoBA Gluon dK/dV kernel needs block_size and Tk multiples of {TILE}; got " \
               f"block_size={block_size}, Tk={tk}"
    return None


def dkdv_gluon(do, q, k, v, lse, delta, index, nb: int, nsel: int, scale, block_size: int,
               block_m=None, stages=None, producer_warps=None):
    """(dk, dv) of bwd.py's contract (index: routed.py's inverse index, nb blocks; nsel routed
    slots per row; delta = rowsum(o·do) fp32 [B, Hq, Tq]); ValueError outside the scope
    (no documents, q_offset 0). block_m, stages, producer_warps: tuning overrides (the flash
    kernel's defaults, PRODUCER_WARPS)."""
    why = dkdv_scope_error(q, k, block_size, False, 0)
    if why is not None:
        raise ValueError(why)
    B, tq, hq, d = q.shape
    hkv = k.shape[2]
    bm, bn, st = DKDV_CFG[d]
    bm, st = block_m or bm, stages or st
    rowptr, entries = index
    rows = entries // nsel   # the entries' query rows (row·NSEL + slot): no division in the loops
    q, k, v, do = (t.contiguous() for t in (q, k, v, do))
    dk = alloc.empty(k.shape, k.dtype, k.device)
    dv = alloc.empty(v.shape, v.dtype, v.device)
    half = HALF_N.value
    _moba_dkdv_kernel[(B * hkv, triton.cdiv(tq, bn))](
        q, do, tile_desc(q, bm), tile_desc(do, bm), tile_desc(k, half), tile_desc(v, half),
        tile_desc(dk, half), tile_desc(dv, half), lse, delta, rowptr, rows, scale * LOG2E_F,
        scale, tq, hq, hq // hkv, block_size, nb, HEAD_DIM=d, BLOCK_M=bm,
        BLOCK_N=bn, STAGES=st, CONSUMER_REGS=CONSUMER_REGS, PRODUCER_REGS=PRODUCER_REGS,
        num_warps=CONSUMER_WARPS, PRODUCER_WARPS=producer_warps or PRODUCER_WARPS)
    return dk, dv
