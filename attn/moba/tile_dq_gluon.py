"""MoBA's tile dQ in Gluon for Hopper (sm_90): fwd.py's _tile_kernel in dQ mode as the persistent
warp-specialized kernel of tile_gluon.py, under MOBA_TILE_DQ_IMPL (fwd.py).

Programs and tiles as tile_gluon.py's (one program per SM walking 128-row tiles in
tile_at's order). Partitions:
  consumer 0 (default, 4 warps) : rows 0..63 of each tile
  consumer 1 (worker, 4 warps)  : rows 64..127
  producer   (worker, 1 warp)   : per tile, its Q and dO halves by TMA into a ring of two tile
      slots, the own block's K/V tiles, then the nsel routed partial dQ sums (routed.py's DQP,
      tile_gluon.partial_load: consumer 0's rows in a stage's K tile, consumer 1's in its V tile)
Per own-block key tile a consumer issues S = Q·Kᵀ and dP = dO·Vᵀ together (routed_dq_gluon.py's
step), forms P = exp2(S·qk_scale − lse·log2 e) (causal mask from the tile at its first row on;
consumer 0 skips the tile past its rows), dS = P ⊙ (dP − delta) as a register operand, and
dQ += dS·K. Then it adds the chosen slots' partials (SEL = −1: never written, selected away),
scales by the softmax scale once and writes dQ through its Q tile by TMA. The Q / dO slot is
freed during the next tile's first step, by when the store has landed.

Memory plan (16-bit): Q and dO rings 2 tiles x 2 halves x [64, D] each, K/V ring STAGES x (K, V)
[64, D]: 224 KB at D = 128 (3 stages), 160 KB at D = 64 (4 stages); lse and delta per row in
registers (loaded at the tile's start). Registers per consumer thread: dQ [64, D] fp32, S and
dP [64, 64] fp32. HBM: Q, dO, the partials read once, dQ written once.

Scope: tile_gluon.tile_scope_error's.
"""
from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma

from attn.common import alloc
from attn.flash.bwd_gluon import LOG2E
from attn.flash.common import _sm_count
from attn.flash.fwd_gluon import (CONSUMER_REGS, CONSUMER_WARPS, HALF_M, PRODUCER_REGS,
                                  cta_sync, kv_ring, mma_layout, tile_desc, tma_store)
from attn.moba.routed_dq_gluon import DQ_STAGES, dq_step
from attn.moba.heads import token_stride
from attn.moba.routed_gluon import chunk_barriers
from attn.moba.tile_gluon import (BLOCK_N, TILE_M, partial_desc, ring_partial, skip_stage,
                                  tile_at, tile_count, tile_producer, tile_scope_error,
                                  tile_span)


@gluon.jit
def _producer(q_desc, do_desc, k_desc, v_desc, p_desc, q_smem, do_smem, k_smem, v_smem, q_ready,
              q_free, k_bar, v_bar, empty, Tq, Tk, hq, group, NQT, n_tiles, q_offset, block_size,
              nsel):
    tile_producer(q_desc, do_desc, k_desc, v_desc, p_desc, q_smem, do_smem, k_smem, v_smem,
                  q_ready, q_free, k_bar, v_bar, empty, Tq, Tk, hq, group, NQT, n_tiles, q_offset,
                  block_size, nsel, True)


@gluon.jit
def _consumer(dq_desc, LSE, DELTA, SEL, q_smem, do_smem, k_smem, v_smem, q_ready, q_free, k_bar,
              v_bar, empty, qk_scale, scale, Tq, hq, NQT, n_tiles, q_offset, block_size, nsel,
              HALF: gl.constexpr):
    HEAD_DIM: gl.constexpr = q_smem.shape[2]
    s_layout: gl.constexpr = mma_layout(BLOCK_N)
    o_layout: gl.constexpr = mma_layout(HEAD_DIM)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    r = 0                                   # K/V ring slots consumed so far
    i = 0                                   # this program's tiles so far
    for k in range(tile_count(n_tiles)):
        bh, q0, f, n = tile_span(tile_at(k), NQT, q_offset, block_size)
        qh = q0 + HALF * HALF_M             # this consumer's first row
        rows = qh + gl.arange(0, HALF_M, layout=row_s)
        qpos = q_offset + rows
        # per-row inputs loaded now: their latency hides under the tile's first steps
        lse2 = gl.load(LSE + bh.to(gl.int64) * Tq + rows) * LOG2E
        delta = gl.load(DELTA + bh.to(gl.int64) * Tq + rows)
        ent = (bh.to(gl.int64) * Tq + gl.arange(0, HALF_M, layout=row_o) + qh) * nsel
        slot = i % 2
        qs = q_smem.index(2 * slot + HALF)
        dos = do_smem.index(2 * slot + HALF)
        mbarrier.wait(q_ready.index(slot), (i // 2) & 1)
        dq = gl.zeros([HALF_M, HEAD_DIM], gl.float32, o_layout)
        # key tiles [f, d) every row sees whole, [d, ne) masked (the diagonal); consumer 0 ends
        # one tile early: tile n − 1 lies past its last row
        d = gl.maximum((q_offset + qh) // BLOCK_N, f)
        ne = n - 1 + HALF
        for j in range(f, ne):
            dq = dq_step(dq, qs, dos, k_smem, v_smem, k_bar, v_bar, empty, r, lse2, delta,
                         qk_scale, j * BLOCK_N, qpos, j >= d)
            if j == f:
                # the previous tile's dQ store has had this step to land: free its slot
                tma.store_wait(pendings=0)
                cta_sync()
                mbarrier.arrive(q_free.index(1 - slot), count=1, pred=i >= 1)
            r += 1
        if HALF == 0:
            skip_stage(k_bar, v_bar, empty, r)
            r += 1

        # the chosen slots' routed partial sums (unscaled Σ dS·K, like dq here)
        for sl in range(nsel):
            ok = gl.load(SEL + ent + sl) >= 0
            part = ring_partial(k_smem, v_smem, k_bar, v_bar, empty, r, o_layout, HALF)
            dq += gl.where(ok[:, None], part.to(gl.float32), 0.0)
            r += 1

        qs.store((dq * scale).to(qs.dtype))  # Q is no longer read: its tile stages dQ
        fence_async_shared()
        tma_store(dq_desc, [(bh // hq) * Tq + qh, (bh % hq) * HEAD_DIM], qs)
        i += 1
    tma.store_wait(pendings=0)              # the last tile's dQ has left shared memory


# partition entry points take runtime values only (fwd_gluon.py), one per consumer half
@gluon.jit
def _rows_0_63(dq_desc, LSE, DELTA, SEL, q_smem, do_smem, k_smem, v_smem, q_ready, q_free, k_bar,
               v_bar, empty, qk_scale, scale, Tq, hq, NQT, n_tiles, q_offset, block_size, nsel):
    _consumer(dq_desc, LSE, DELTA, SEL, q_smem, do_smem, k_smem, v_smem, q_ready, q_free, k_bar,
              v_bar, empty, qk_scale, scale, Tq, hq, NQT, n_tiles, q_offset, block_size, nsel, 0)


@gluon.jit
def _rows_64_127(dq_desc, LSE, DELTA, SEL, q_smem, do_smem, k_smem, v_smem, q_ready, q_free,
                 k_bar, v_bar, empty, qk_scale, scale, Tq, hq, NQT, n_tiles, q_offset,
                 block_size, nsel):
    _consumer(dq_desc, LSE, DELTA, SEL, q_smem, do_smem, k_smem, v_smem, q_ready, q_free, k_bar,
              v_bar, empty, qk_scale, scale, Tq, hq, NQT, n_tiles, q_offset, block_size, nsel, 1)


@gluon.jit
def _tile_dq_kernel(q_desc, do_desc, k_desc, v_desc, p_desc, dq_desc, LSE, DELTA, SEL, qk_scale,
                    scale, Tq, Tk, hq, group, NQT, n_tiles, q_offset, block_size, nsel,
                    HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                    PRODUCER_REGS: gl.constexpr, num_warps: gl.constexpr):
    """Persistent: program pid takes tiles tile_at(0), tile_at(1), ... of n_tiles = B·Hq·NQT."""
    gl.static_assert(num_warps == CONSUMER_WARPS)
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [4, HALF_M, HEAD_DIM], q_desc.layout)
    do_smem = gl.allocate_shared_memory(q_desc.dtype, [4, HALF_M, HEAD_DIM], q_desc.layout)
    q_ready, q_free = chunk_barriers()
    k_smem, v_smem, k_bar, v_bar, empty = kv_ring(k_desc, v_desc, STAGES)
    fence_async_shared()

    consumer_args = (dq_desc, LSE, DELTA, SEL, q_smem, do_smem, k_smem, v_smem, q_ready, q_free,
                     k_bar, v_bar, empty, qk_scale, scale, Tq, hq, NQT, n_tiles, q_offset,
                     block_size, nsel)
    gl.warp_specialize([
        (_rows_0_63, consumer_args),
        (_rows_64_127, consumer_args),
        (_producer, (q_desc, do_desc, k_desc, v_desc, p_desc, q_smem, do_smem, k_smem, v_smem,
                     q_ready, q_free, k_bar, v_bar, empty, Tq, Tk, hq, group, NQT, n_tiles,
                     q_offset, block_size, nsel)),
    ], [CONSUMER_WARPS, 1], [CONSUMER_REGS, PRODUCER_REGS])


# launch

def tile_dq_gluon(do, q, k, v, lse, delta, sel, dqp, scale: float, scale_log2: float,
                  q_offset: int, block_size: int, programs=None, out=None):
    """dQ of fwd.dq_triton's contract given the routed partial sums dqp and sel, through the
    persistent Gluon kernel; ValueError outside its scope (documents are the caller's to rule
    out). programs: tuning override of the grid (default: one per SM); out: the dq to write (a
    head piece's view, heads.py), else a new one."""
    why = tile_scope_error(q, k, block_size, q_offset, False)
    if why is not None:
        raise ValueError(why.replace("tile forward", "tile dQ"))
    B, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    nsel = sel.shape[-1]
    dq = alloc.empty(q.shape, q.dtype, q.device) if out is None else out
    token_stride(q, do, dq)
    token_stride(k, v)
    p_desc = partial_desc(dqp, tq, d)
    nqt = tq // TILE_M.value
    n_tiles = B * hq * nqt
    grid = min(programs or _sm_count(q.device.index or 0), n_tiles)
    _tile_dq_kernel[(grid,)](
        tile_desc(q, HALF_M.value), tile_desc(do, HALF_M.value), tile_desc(k, BLOCK_N.value),
        tile_desc(v, BLOCK_N.value), p_desc, tile_desc(dq, HALF_M.value), lse, delta, sel,
        scale_log2, scale, tq, tk, hq, hq // hkv, nqt, n_tiles, q_offset, block_size, nsel,
        HEAD_DIM=d, STAGES=DQ_STAGES[d], CONSUMER_REGS=CONSUMER_REGS,
        PRODUCER_REGS=PRODUCER_REGS, num_warps=CONSUMER_WARPS)
    return dq
