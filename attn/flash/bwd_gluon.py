"""dK/dV kernel in Gluon for Hopper (sm_90), warp-specialized like fwd_gluon.py: the split
backward's dK/dV on Hopper within its scope (bwd._dkdv_gluon, FLASH_DKDV_IMPL); the dQ kernel
stays bwd.py's.

Partitions of one program (BLOCK_N = 128 keys of one (batch, KV head)):
  consumer 0 (the default partition, 4 warps) : keys 0..63 of the tile
  consumer 1 (worker, 4 warps)                : keys 64..127
  producer   (worker, 1 warp)                 : TMA loads of Q and dO blocks into the ring
Each consumer keeps its K, V half in shared memory and dK, dV [64, D] fp32 in registers, and per
query block i (BLOCK_M rows of one query head of the GQA group; the producer walks the heads,
then the blocks) runs:
  Sᵀ = K·Q_iᵀ and dPᵀ = V·dO_iᵀ issued together; wait Sᵀ; Pᵀ = exp2(Sᵀ·qk_scale − lse₂)
  (masked); dV += Pᵀ·dO_i issued; wait dPᵀ; dSᵀ = Pᵀ ⊙ (dPᵀ − delta); dK += dSᵀ·Q_i issued;
  wait both; release the stage.
Pᵀ and dSᵀ are the wgmma's register A operands (the key rows are the M side), so neither goes
through shared memory. Memory plan: shared K, V 2 x [64, D] each (also the staging tiles of the
dK, dV stores), STAGES x (Q, dO) [BLOCK_M, D]; registers per consumer thread: dK, dV
[64, D] fp32 / 128 threads, Sᵀ and dPᵀ [64, BLOCK_M] fp32, Pᵀ and dSᵀ 16-bit.

Masking (op.py's rule, seen from the key side): query at position p sees key s iff
s <= p <= hi(s), hi(s) = min(document end of s, s + window − 1). The program walks query blocks
[m_lo, m_hi) (from the block of its first key's position to its last key's hi); per consumer,
the blocks every (key, query) pair sees whole skip the mask, the rest are masked (and rows
past Tq). Scope: fwd_gluon.scope_error's, and Tk a multiple of 128 when B > 1.
"""
from __future__ import annotations

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                              warpgroup_mma, warpgroup_mma_wait)

from attn.common import alloc
from attn.common.jit import LOG2E_F
from attn.flash.fwd_gluon import (CONSUMER_REGS, CONSUMER_WARPS, PRODUCER_REGS, cta_sync,
                                  mask_args, mma_layout, scope_error, tile_desc, tma_load,
                                  tma_store)

HALF_N = gl.constexpr(64)      # keys per consumer warpgroup (one wgmma M tile)
LOG2E = gl.constexpr(1.4426950408889634)  # log2(e): lse into the log2 domain


@gluon.jit
def _dkdv_step(it, i, dk, dv, k_c, v_c, q_smem, do_smem, ready, empty, LSE_h, DELTA_h, kpos, hi_k,
               q_offset, Tq, qk_scale, BLOCK_M: gl.constexpr, STAGES: gl.constexpr,
               s_layout: gl.constexpr, p_layout: gl.constexpr, MASKED: gl.constexpr):
    """Query block i (ring slot it): the module docstring's step on this consumer's keys."""
    st = it % STAGES
    mbarrier.wait(ready.index(st), (it // STAGES) & 1)
    qs = q_smem.index(st)
    dos = do_smem.index(st)
    s = warpgroup_mma(k_c, qs.permute((1, 0)), gl.zeros([HALF_N, BLOCK_M], gl.float32, s_layout),
                      use_acc=False, is_async=True)
    dp = warpgroup_mma(v_c, dos.permute((1, 0)),
                       gl.zeros([HALF_N, BLOCK_M], gl.float32, s_layout), use_acc=False,
                       is_async=True)
    rows = i * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, s_layout))
    r_ok = rows < Tq
    lse2 = gl.load(LSE_h + rows, mask=r_ok, other=0.0) * LOG2E
    delta = gl.load(DELTA_h + rows, mask=r_ok, other=0.0)
    s = warpgroup_mma_wait(num_outstanding=1, deps=(s,))          # Sᵀ done, dPᵀ may run
    p = gl.exp2(s * qk_scale - lse2[None, :])
    if MASKED:
        qpos = q_offset + rows
        ok = (qpos[None, :] >= kpos[:, None]) & (qpos[None, :] <= hi_k[:, None]) & r_ok[None, :]
        p = gl.where(ok, p, 0.0)     # select, not multiply: masked scores may overflow exp2
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
def dkdv_rows(dk, dv, it, start, end, k_c, v_c, q_smem, do_smem, ready, empty, LSE_h, DELTA_h,
               kpos, hi_k, q_offset, Tq, qk_scale, BLOCK_M: gl.constexpr, STAGES: gl.constexpr,
               s_layout: gl.constexpr, p_layout: gl.constexpr, MASKED: gl.constexpr):
    """Query blocks [start, end) of one head; it: the ring slot of block start."""
    for i in range(start, end):
        dk, dv = _dkdv_step(it, i, dk, dv, k_c, v_c, q_smem, do_smem, ready, empty, LSE_h,
                            DELTA_h, kpos, hi_k, q_offset, Tq, qk_scale, BLOCK_M, STAGES,
                            s_layout, p_layout, MASKED)
        it += 1
    return dk, dv, it


@gluon.jit
def kv_half(k_desc, v_desc, k_smem, v_smem, kv_bar, row_k, kc, col, HALF: gl.constexpr):
    """This consumer's K, V tiles (keys kc .. kc + 63), loaded by TMA and waited for."""
    k_c = k_smem.index(HALF)
    v_c = v_smem.index(HALF)
    bar = kv_bar.index(HALF)
    mbarrier.expect(bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
    tma_load(k_desc, [row_k + kc, col], bar, k_c)
    tma_load(v_desc, [row_k + kc, col], bar, v_c)
    mbarrier.wait(bar, 0)
    return k_c, v_c


@gluon.jit
def dkdv_heads(dk, dv, k_c, v_c, q_smem, do_smem, ready, empty, LSE, DELTA, kpos, hi_k, q_offset,
               Tq, qk_scale, b, hq, hkv, group, m_lo, f_lo, f_hi, m_hi, s_layout: gl.constexpr,
               p_layout: gl.constexpr):
    """dK, dV of this consumer's keys over every query head of the GQA group, query blocks
    [m_lo, f_lo) masked, [f_lo, f_hi) whole, [f_hi, m_hi) masked (the producer's order)."""
    BLOCK_M: gl.constexpr = q_smem.shape[1]
    STAGES: gl.constexpr = q_smem.shape[0]
    it = m_lo * 0
    for g in range(group):
        row = (b * hq + hkv * group + g).to(gl.int64) * Tq
        dk, dv, it = dkdv_rows(dk, dv, it, m_lo, f_lo, k_c, v_c, q_smem, do_smem, ready, empty,
                               LSE + row, DELTA + row, kpos, hi_k, q_offset, Tq, qk_scale,
                               BLOCK_M, STAGES, s_layout, p_layout, True)
        dk, dv, it = dkdv_rows(dk, dv, it, f_lo, f_hi, k_c, v_c, q_smem, do_smem, ready, empty,
                               LSE + row, DELTA + row, kpos, hi_k, q_offset, Tq, qk_scale,
                               BLOCK_M, STAGES, s_layout, p_layout, False)
        dk, dv, it = dkdv_rows(dk, dv, it, f_hi, m_hi, k_c, v_c, q_smem, do_smem, ready, empty,
                               LSE + row, DELTA + row, kpos, hi_k, q_offset, Tq, qk_scale,
                               BLOCK_M, STAGES, s_layout, p_layout, True)
    return dk, dv


@gluon.jit
def dkdv_ring(q_desc, do_desc, k_desc, v_desc, STAGES: gl.constexpr):
    """Shared memory and barriers of a dK/dV program: the (Q, dO) stage ring with its ready /
    empty barriers (empty: one arrival per consumer), both consumers' K, V halves and their
    load barriers."""
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[0]
    HEAD_DIM: gl.constexpr = q_desc.block_type.shape[1]
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [STAGES, BLOCK_M, HEAD_DIM], q_desc.layout)
    do_smem = gl.allocate_shared_memory(do_desc.dtype, [STAGES, BLOCK_M, HEAD_DIM],
                                        do_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [2, HALF_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [2, HALF_N, HEAD_DIM], v_desc.layout)
    kv_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(kv_bar.index(i), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)   # one arrival per consumer
    fence_async_shared()
    return q_smem, do_smem, k_smem, v_smem, kv_bar, ready, empty


@gluon.jit
def _consumer(k_desc, v_desc, dk_desc, dv_desc, LSE, DELTA, SEG_END, q_smem, do_smem, k_smem,
              v_smem, kv_bar, ready, empty, qk_scale, scale, Tq, Tk, q_offset, window, has_seg,
              hq, group, row_k, k0, col, b, hkv, m_lo, m_hi, HALF: gl.constexpr):
    HEAD_DIM: gl.constexpr = k_desc.block_type.shape[1]
    BLOCK_M: gl.constexpr = q_smem.shape[1]
    s_layout: gl.constexpr = mma_layout(BLOCK_M)
    o_layout: gl.constexpr = mma_layout(HEAD_DIM)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    kc = k0 + HALF * HALF_N            # this consumer's first key
    k_c, v_c = kv_half(k_desc, v_desc, k_smem, v_smem, kv_bar, row_k, kc, col, HALF)

    # per key: the last query position that sees it (op.py's rule, key side)
    kpos = kc + gl.arange(0, HALF_N, layout=gl.SliceLayout(1, s_layout))
    k_ok = kpos < Tk
    big = Tq + q_offset                # past every query position
    hi_k = gl.minimum(kpos + window - 1, big)
    hi_k = gl.minimum(hi_k, gl.load(SEG_END + kpos, mask=k_ok & (has_seg != 0), other=big))
    # query blocks [m_lo, f_lo) masked, [f_lo, f_hi) whole, [f_hi, m_hi) masked
    k_last = gl.minimum(kc + HALF_N, Tk) - 1
    hi_first = gl.min(hi_k, axis=0)
    f_lo = gl.minimum(gl.maximum(gl.cdiv(gl.maximum(k_last - q_offset, 0), BLOCK_M), m_lo), m_hi)
    f_hi = gl.minimum(gl.maximum(gl.minimum(hi_first - q_offset + 1, Tq) // BLOCK_M, f_lo), m_hi)

    dk = gl.zeros([HALF_N, HEAD_DIM], gl.float32, o_layout)
    dv = gl.zeros([HALF_N, HEAD_DIM], gl.float32, o_layout)
    dk, dv = dkdv_heads(dk, dv, k_c, v_c, q_smem, do_smem, ready, empty, LSE, DELTA, kpos, hi_k,
                        q_offset, Tq, qk_scale, b, hq, hkv, group, m_lo, f_lo, f_hi, m_hi,
                        s_layout, p_layout)

    # K and V are no longer read: their tiles stage dK (scaled) and dV for the TMA stores
    k_c.store((dk * scale).to(k_c.dtype))
    v_c.store(dv.to(v_c.dtype))
    fence_async_shared()
    tma_store(dk_desc, [row_k + kc, col], k_c)
    tma_store(dv_desc, [row_k + kc, col], v_c)
    tma.store_wait(pendings=0)


@gluon.jit
def _consumer_keys_0_63(k_desc, v_desc, dk_desc, dv_desc, LSE, DELTA, SEG_END, q_smem, do_smem,
                        k_smem, v_smem, kv_bar, ready, empty, qk_scale, scale, Tq, Tk, q_offset,
                        window, has_seg, hq, group, row_k, k0, col, b, hkv, m_lo, m_hi):
    _consumer(k_desc, v_desc, dk_desc, dv_desc, LSE, DELTA, SEG_END, q_smem, do_smem, k_smem,
              v_smem, kv_bar, ready, empty, qk_scale, scale, Tq, Tk, q_offset, window, has_seg,
              hq, group, row_k, k0, col, b, hkv, m_lo, m_hi, 0)


@gluon.jit
def _consumer_keys_64_127(k_desc, v_desc, dk_desc, dv_desc, LSE, DELTA, SEG_END, q_smem,
                          do_smem, k_smem, v_smem, kv_bar, ready, empty, qk_scale, scale, Tq, Tk,
                          q_offset, window, has_seg, hq, group, row_k, k0, col, b, hkv, m_lo,
                          m_hi):
    _consumer(k_desc, v_desc, dk_desc, dv_desc, LSE, DELTA, SEG_END, q_smem, do_smem, k_smem,
              v_smem, kv_bar, ready, empty, qk_scale, scale, Tq, Tk, q_offset, window, has_seg,
              hq, group, row_k, k0, col, b, hkv, m_lo, m_hi, 1)


@gluon.jit
def qdo_producer(q_desc, do_desc, q_smem, do_smem, ready, empty, row_q, hkv, group, m_lo, m_hi):
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[0]
    HEAD_DIM: gl.constexpr = q_desc.block_type.shape[1]
    STAGES: gl.constexpr = q_smem.shape[0]
    it = m_lo * 0
    for g in range(group):
        col = (hkv * group + g) * HEAD_DIM
        for i in range(m_lo, m_hi):
            st = it % STAGES
            # the stage's previous block (it − STAGES) must have been released by both consumers
            mbarrier.wait(empty.index(st), ((it // STAGES) + 1) & 1, pred=it >= STAGES)
            mbarrier.expect(ready.index(st),
                            q_desc.block_type.nbytes + do_desc.block_type.nbytes)
            tma_load(q_desc, [row_q + i * BLOCK_M, col], ready.index(st), q_smem.index(st))
            tma_load(do_desc, [row_q + i * BLOCK_M, col], ready.index(st), do_smem.index(st))
            it += 1


@gluon.jit
def _dkdv_gluon_kernel(q_desc, k_desc, v_desc, do_desc, dk_desc, dv_desc, LSE, DELTA, SEG_END,
                       qk_scale, scale, Tq, Tk, q_offset, window, has_seg, hq, group,
                       HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                       STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                       PRODUCER_REGS: gl.constexpr, num_warps: gl.constexpr):
    gl.static_assert(BLOCK_N == 2 * HALF_N)
    gl.static_assert(num_warps == CONSUMER_WARPS)
    k0 = gl.program_id(0) * BLOCK_N    # key block 0 sees the most queries: it launches first
    pid_bh = gl.program_id(1)
    hkv_n = hq // group
    b = pid_bh // hkv_n
    hkv = pid_bh % hkv_n
    row_q = b * Tq                     # first row of this batch in the [B·T, H·D] views
    row_k = b * Tk
    col = hkv * HEAD_DIM
    # query blocks [m_lo, m_hi): from the first key's position to the last key's hi
    big = Tq + q_offset
    k_last = gl.minimum(k0 + BLOCK_N, Tk) - 1
    hi_last = gl.minimum(k_last + window - 1, big)
    hi_last = gl.minimum(hi_last, gl.load(SEG_END + k_last, mask=has_seg != 0, other=big))
    m_lo = gl.maximum(k0 - q_offset, 0) // BLOCK_M
    m_hi = gl.maximum(gl.cdiv(gl.minimum(hi_last - q_offset + 1, Tq), BLOCK_M), m_lo)

    q_smem, do_smem, k_smem, v_smem, kv_bar, ready, empty = dkdv_ring(q_desc, do_desc, k_desc,
                                                                      v_desc, STAGES)
    consumer_args = (k_desc, v_desc, dk_desc, dv_desc, LSE, DELTA, SEG_END, q_smem, do_smem,
                     k_smem, v_smem, kv_bar, ready, empty, qk_scale, scale, Tq, Tk, q_offset,
                     window, has_seg, hq, group, row_k, k0, col, b, hkv, m_lo, m_hi)
    gl.warp_specialize([
        (_consumer_keys_0_63, consumer_args),
        (_consumer_keys_64_127, consumer_args),
        (qdo_producer, (q_desc, do_desc, q_smem, do_smem, ready, empty, row_q, hkv, group, m_lo,
                     m_hi)),
    ], [CONSUMER_WARPS, 1], [CONSUMER_REGS, PRODUCER_REGS])


# launch

# (BLOCK_M, BLOCK_N, STAGES) per head dim. Shared memory: K, V 128 x D + STAGES x (Q, dO)
# BLOCK_M x D, 16-bit: 192 KB at D = 128, 96 KB at D = 64. Registers (ptxas, sm_90a, triton 3.6):
# at D = 128 64-query blocks spill 144 bytes (dK, dV take 128 registers a thread, Sᵀ, dPᵀ 64 more)
# and still beat the spill-free 32-query blocks by 10 % on the H200 (docs/flash_notes.md, row 18);
# triton 3.9's code generation spills 632 bytes there (72 with 32-query blocks): 32 on it
_BM128 = 64 if triton.__version__.startswith("3.6") else 32
DKDV_CFG = {64: (64, 128, 4), 128: (_BM128, 128, 4 if _BM128 == 64 else 6)}


def dkdv_scope_error(q, k) -> str | None:
    """Why the Gluon dK/dV kernel cannot run (q, k), or None."""
    why = scope_error(q, k)
    if why is not None:
        return why.replace("Gluon flash forward", "Gluon dK/dV kernel")
    if k.shape[0] > 1 and k.shape[1] % 128:
        return f"the Gluon dK/dV kernel needs Tk a multiple of 128 when B > 1 (a key tile must " \
               f"not run into the next batch); got B={k.shape[0]}, Tk={k.shape[1]}"
    return None


def dkdv_gluon(do, q, k, v, lse, delta, scale, seg_end, q_offset, window, block_m=None,
               stages=None):
    """(dk, dv) of bwd.py's contract (seg_end: each key position's document end, int32 [Tk];
    delta = rowsum(o·do) fp32 [B, Hq, Tq]) through the Gluon kernel; ValueError outside its
    scope. block_m, stages: tuning overrides."""
    why = dkdv_scope_error(q, k)
    if why is not None:
        raise ValueError(why)
    B, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    bm, bn, st = DKDV_CFG[d]
    bm, st = block_m or bm, stages or st
    q, k, v, do = (t.contiguous() for t in (q, k, v, do))
    dk = alloc.empty(k.shape, k.dtype, k.device)
    dv = alloc.empty(v.shape, v.dtype, v.device)
    seg, win, has_seg = mask_args(seg_end, window, lse)
    half = HALF_N.value
    _dkdv_gluon_kernel[(triton.cdiv(tk, bn), B * hkv)](
        tile_desc(q, bm), tile_desc(k, half), tile_desc(v, half), tile_desc(do, bm),
        tile_desc(dk, half), tile_desc(dv, half), lse, delta, seg, scale * LOG2E_F, scale, tq,
        tk, q_offset, win, has_seg, hq, hq // hkv, HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn,
        STAGES=st, CONSUMER_REGS=CONSUMER_REGS, PRODUCER_REGS=PRODUCER_REGS,
        num_warps=CONSUMER_WARPS)
    return dk, dv
