"""MoBA's routed dQ in Gluon for Hopper (sm_90): routed.py's _routed_dq_kernel on the partitions of
the Gluon routed forward (routed_gluon.py), under MOBA_ROUTED_DQ_IMPL (routed.py).

Grid and work as routed_gluon.py's: DQ_SPLIT programs per (batch·query head, block), program z
taking the chunks z, z + DQ_SPLIT, ... of 128 entries of the block's inverse-index list.
Partitions:
  consumer 0 (default, 4 warps) : entries 0..63 of each chunk
  consumer 1 (worker, 4 warps)  : entries 64..127
  producer   (worker, PRODUCER_WARPS warps) : routed_gluon.chunk_producer: per chunk, the 128
      rows' Q and dO by cp.async into a ring of two chunk slots, with their lse and delta (row
      ids loaded a chunk ahead), then the block's K/V tiles by TMA into the K/V ring (slots
      counted across chunks)
Per key tile a consumer issues S = Q·Kᵀ and dP = dO·Vᵀ together, waits for S, forms
P = exp2(S·qk_scale − lse·log2 e), waits for dP, dS = P ⊙ (dP − delta) (a register operand),
dQ += dS·K; then releases the stage. No masks: the block lies wholly before its routed rows and
is complete. After the block's last tile: the unscaled partial Σ dS·K per entry, as routed.py's,
DQP [B·Hq, Tq·NSEL, D] (through the consumer's Q tile, then row stores); then the chunk slot is
freed. Padding entries of a chunk's tail copy nothing (zeros in the slot, never stored).

Memory plan (16-bit): Q and dO rings 2 chunks x 2 halves x [64, D] each, lse and delta
2 x [128] fp32, K/V ring STAGES x (K, V) [BLOCK_N, D]: 224 KB at D = 128 (3 stages), 160 KB at
D = 64 (4 stages). Registers per consumer thread: dQ [64, D] fp32, S and dP [64, BLOCK_N] fp32.

Scope: routed_gluon.routed_scope_error's.
"""
from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier,
                                                              warpgroup_mma, warpgroup_mma_wait)

from attn.flash.bwd_gluon import LOG2E
from attn.flash.fwd_gluon import (CONSUMER_REGS, CONSUMER_WARPS, HALF_M, PRODUCER_REGS, cta_sync,
                                  kv_ring, mma_layout, tile_desc)
from attn.moba.dkdv_gluon import row_copy_layout
from attn.moba.heads import gather_heads, token_stride
from attn.moba.routed_gluon import (BLOCK_N, PRODUCER_WARPS, TILE, chunk_barriers,
                                    chunk_producer, consumer_entries, routed_scope_error,
                                    routed_work, store_entries)

# K/V ring stages per head dim (shared memory in the module docstring; 2 stages suffice for the
# step's order, more let the producer run ahead)
DQ_STAGES = {64: 4, 128: 3}
# programs per (block, head): fewer leave blocks' long row lists unsplit, more re-read K/V
DQ_SPLIT = 2


@gluon.jit
def _producer(Q, DO, LSE, DELTA, ROWS, ROWPTR, k_desc, v_desc, q_smem, do_smem, lse_smem,
              delta_smem, k_smem, v_smem, q_ready, q_free, k_bar, v_bar, empty, Tq, Tk, hq, group,
              NB, block_size, grp, c0, cstep, nch):
    chunk_producer(Q, DO, LSE, DELTA, ROWS, ROWPTR, k_desc, v_desc, q_smem, do_smem, lse_smem,
                   delta_smem, k_smem, v_smem, q_ready, q_free, k_bar, v_bar, empty, Tq, Tk, hq,
                   group, NB, block_size, grp, c0, cstep, nch, True)


@gluon.jit
def dq_step(dq, qs, dos, k_smem, v_smem, k_bar, v_bar, empty, r, lse2, delta, qk_scale, kpos0,
            qpos, masked):
    """dQ += dS·K (unscaled) over the key tile in ring slot r, then the slot released: S = Q·Kᵀ
    and dP = dO·Vᵀ issued together, P = exp2(S·qk_scale − lse2) formed while dP runs (masked:
    key kpos0 + c is seen by the rows with qpos >= it, P = 0 elsewhere), dS = P ⊙ (dP − delta)
    as the register operand of the last product."""
    STAGES: gl.constexpr = k_smem.shape[0]
    BN: gl.constexpr = k_smem.shape[1]
    s_layout: gl.constexpr = mma_layout(BN)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=dq.type.layout,
                                                 k_width=2)
    st = r % STAGES
    mbarrier.wait(k_bar.index(st), (r // STAGES) & 1)
    s = warpgroup_mma(qs, k_smem.index(st).permute((1, 0)),
                      gl.zeros([HALF_M, BN], gl.float32, s_layout), use_acc=False, is_async=True)
    mbarrier.wait(v_bar.index(st), (r // STAGES) & 1)
    dp = warpgroup_mma(dos, v_smem.index(st).permute((1, 0)),
                       gl.zeros([HALF_M, BN], gl.float32, s_layout), use_acc=False, is_async=True)
    s = warpgroup_mma_wait(num_outstanding=1, deps=(s,))      # S done, dP may run
    p = gl.exp2(s * qk_scale - lse2[:, None])
    if masked:
        kpos = kpos0 + gl.arange(0, BN, layout=gl.SliceLayout(0, s_layout))
        p = gl.where(kpos[None, :] <= qpos[:, None], p, 0.0)
    dp = warpgroup_mma_wait(num_outstanding=0, deps=(dp,))
    ds16 = gl.convert_layout((p * (dp - delta[:, None])).to(qs.dtype), p_layout)
    dq = warpgroup_mma(ds16, k_smem.index(st), dq, is_async=True)
    dq, ds16 = warpgroup_mma_wait(num_outstanding=0, deps=(dq, ds16))
    cta_sync()         # every warp of this consumer is done with the stage
    mbarrier.arrive(empty.index(st), count=1)
    return dq


@gluon.jit
def _consumer(DQP, ENTRIES, ROWPTR, q_smem, do_smem, lse_smem, delta_smem, k_smem, v_smem,
              q_ready, q_free, k_bar, v_bar, empty, qk_scale, Tq, NB, nsel, block_size, grp, c0,
              cstep, nch, HALF: gl.constexpr):
    HEAD_DIM: gl.constexpr = q_smem.shape[2]
    s_layout: gl.constexpr = mma_layout(BLOCK_N)
    o_layout: gl.constexpr = mma_layout(HEAD_DIM)
    rows_l: gl.constexpr = row_copy_layout(HEAD_DIM, CONSUMER_WARPS)
    n_tiles = block_size // BLOCK_N
    bh, end, first = consumer_entries(ROWPTR, grp, NB, c0, HALF)
    for c in range(nch):
        slot = c % 2
        qs = q_smem.index(2 * slot + HALF)
        dos = do_smem.index(2 * slot + HALF)
        mbarrier.wait(q_ready.index(slot), (c // 2) & 1)
        fence_async_shared()   # the slot was written by cp.async (generic proxy), wgmma reads it
        lse2 = lse_smem.index(slot).slice(HALF * HALF_M, HALF_M).load(
            gl.SliceLayout(1, s_layout)) * LOG2E
        delta = delta_smem.index(slot).slice(HALF * HALF_M, HALF_M).load(
            gl.SliceLayout(1, s_layout))
        dq = gl.zeros([HALF_M, HEAD_DIM], gl.float32, o_layout)
        for t in range(n_tiles):
            dq = dq_step(dq, qs, dos, k_smem, v_smem, k_bar, v_bar, empty, c * n_tiles + t,
                         lse2, delta, qk_scale, 0, 0, False)

        # the partial Σ dS·K (unscaled) through qs (Q is no longer read)
        store_entries(DQP, ENTRIES, qs, dq, first + c * cstep * TILE, end, bh, Tq, nsel, rows_l)
        cta_sync()                             # every warp has read the slot
        mbarrier.arrive(q_free.index(slot), count=1)


# partition entry points take runtime values only (fwd_gluon.py), one per consumer half
@gluon.jit
def _entries_0_63(DQP, ENTRIES, ROWPTR, q_smem, do_smem, lse_smem, delta_smem, k_smem, v_smem,
                  q_ready, q_free, k_bar, v_bar, empty, qk_scale, Tq, NB, nsel, block_size, grp,
                  c0, cstep, nch):
    _consumer(DQP, ENTRIES, ROWPTR, q_smem, do_smem, lse_smem, delta_smem, k_smem, v_smem,
              q_ready, q_free, k_bar, v_bar, empty, qk_scale, Tq, NB, nsel, block_size, grp, c0,
              cstep, nch, 0)


@gluon.jit
def _entries_64_127(DQP, ENTRIES, ROWPTR, q_smem, do_smem, lse_smem, delta_smem, k_smem, v_smem,
                    q_ready, q_free, k_bar, v_bar, empty, qk_scale, Tq, NB, nsel, block_size,
                    grp, c0, cstep, nch):
    _consumer(DQP, ENTRIES, ROWPTR, q_smem, do_smem, lse_smem, delta_smem, k_smem, v_smem,
              q_ready, q_free, k_bar, v_bar, empty, qk_scale, Tq, NB, nsel, block_size, grp, c0,
              cstep, nch, 1)


@gluon.jit
def _routed_dq_kernel(Q, DO, LSE, DELTA, q_desc, k_desc, v_desc, DQP, ENTRIES, ROWS, ROWPTR,
                      qk_scale, Tq, Tk, NB, hq, group, nsel, split, block_size,
                      HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                      PRODUCER_REGS: gl.constexpr, num_warps: gl.constexpr,
                      PRODUCER_WARPS: gl.constexpr):
    """q_desc: only the Q / dO tiles' shape, dtype and shared layout (the rows are gathered)."""
    gl.static_assert(num_warps == CONSUMER_WARPS)
    grp, c0, nch = routed_work(ROWPTR, NB, split)
    if nch == 0:
        return

    q_smem = gl.allocate_shared_memory(q_desc.dtype, [4, HALF_M, HEAD_DIM], q_desc.layout)
    do_smem = gl.allocate_shared_memory(q_desc.dtype, [4, HALF_M, HEAD_DIM], q_desc.layout)
    rows_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
    lse_smem = gl.allocate_shared_memory(gl.float32, [2, TILE], rows_layout)
    delta_smem = gl.allocate_shared_memory(gl.float32, [2, TILE], rows_layout)
    q_ready, q_free = chunk_barriers()
    k_smem, v_smem, k_bar, v_bar, empty = kv_ring(k_desc, v_desc, STAGES)
    fence_async_shared()

    consumer_args = (DQP, ENTRIES, ROWPTR, q_smem, do_smem, lse_smem, delta_smem, k_smem, v_smem,
                     q_ready, q_free, k_bar, v_bar, empty, qk_scale, Tq, NB, nsel, block_size,
                     grp, c0, split, nch)
    gl.warp_specialize([
        (_entries_0_63, consumer_args),
        (_entries_64_127, consumer_args),
        (_producer, (Q, DO, LSE, DELTA, ROWS, ROWPTR, k_desc, v_desc, q_smem, do_smem, lse_smem,
                     delta_smem, k_smem, v_smem, q_ready, q_free, k_bar, v_bar, empty, Tq, Tk,
                     hq, group, NB, block_size, grp, c0, split, nch)),
    ], [CONSUMER_WARPS, PRODUCER_WARPS], [CONSUMER_REGS, PRODUCER_REGS])


# launch

def routed_dq_gluon(do, q, k, v, lse, delta, index, nb: int, nsel: int, scale_log2: float,
                    block_size: int, dqp, splits=None):
    """routed.routed_dq's DQP written into dqp through the Gluon kernel; ValueError outside its
    scope (documents are the caller's to rule out, as for routed_gluon.routed_fwd_gluon).
    splits: tuning override of DQ_SPLIT."""
    why = routed_scope_error(q, k, block_size, False)
    if why is not None:
        raise ValueError(why.replace("routed forward", "routed dQ"))
    B, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    rowptr, entries = index
    rows = entries // nsel     # the entries' query rows: no division in the producer
    token_stride(k, v)
    split = splits or DQ_SPLIT
    # the producer's hq: the full tensor's head count, also for a head piece (heads.gather_heads)
    _routed_dq_kernel[(nb * split, B * hq)](
        q, do, lse, delta, tile_desc(q, HALF_M.value), tile_desc(k, BLOCK_N.value),
        tile_desc(v, BLOCK_N.value), dqp, entries, rows, rowptr, scale_log2, tq, tk, nb,
        gather_heads(q, do), hq // hkv, nsel, split, block_size, HEAD_DIM=d, STAGES=DQ_STAGES[d],
        CONSUMER_REGS=CONSUMER_REGS, PRODUCER_REGS=PRODUCER_REGS, num_warps=CONSUMER_WARPS,
        PRODUCER_WARPS=PRODUCER_WARPS)
    return dqp
