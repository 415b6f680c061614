"""Warp-specialized variant of the Gluon forward (fwd_gluon.py), FLASH_FWD_IMPL=gluon-ws:
FlashAttention-3's producer / consumer split on Hopper.

Partitions of one program (BLOCK_M = 128 query rows of one (batch, query head)):
  consumer 0 (the default partition, 4 warps) : rows 0..63 of the tile
  consumer 1 (worker, 4 warps)                : rows 64..127
  producer   (worker, 1 warp, 24 registers)   : TMA loads of every K/V block into the ring
Each consumer runs fwd_gluon's step on its own 64 rows (Q half, S, P, O in its registers: the
softmax of block j while its P·V product of block j − 1 runs) and writes its own O half and lse.
The stage ring is guarded by mbarriers both ways: `ready` (TMA completion, per K and per V tile)
and `empty` (count 2: each consumer arrives once it has read a stage), so the two consumers
never wait for each other: their softmax and product phases drift apart and interleave on the
tensor cores (FA3's ping-pong, not enforced here), and no CTA barrier remains in the loop.
Memory plan: shared Q 2 x [64, D] (also the staging tiles of the O stores), STAGES x K and V
[BLOCK_N, D]; registers per consumer thread: O [64, D] fp32 / 128 threads, S [64, BLOCK_N] fp32,
P 16-bit. Masking: consumer c's rows start at q0 + 64c; key blocks at or past that start take
the causal mask (a block wholly above the diagonal for these rows gives p = 0 and is still read
and released, so both consumers walk the same blocks). Scope: fwd_gluon's.
"""
from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                              warpgroup_mma, warpgroup_mma_wait)

from attn.flash.fwd_gluon import LN2, _handover, _softmax, cta_sync, tma_load, tma_store

HALF_M = gl.constexpr(64)     # rows per consumer warpgroup (one wgmma M tile)
CONSUMER_WARPS = gl.constexpr(4)


@gluon.jit
def _producer(k_desc, v_desc, k_smem, v_smem, k_bar, v_bar, empty, row0, col, n):
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    STAGES: gl.constexpr = k_smem.shape[0]
    for blk in range(n):
        st = blk % STAGES
        # the stage's previous block (blk − STAGES) must have been released by both consumers
        mbarrier.wait(empty.index(st), ((blk // STAGES) + 1) & 1, pred=blk >= STAGES)
        mbarrier.expect(k_bar.index(st), k_desc.block_type.nbytes)
        tma_load(k_desc, [row0 + blk * BLOCK_N, col], k_bar.index(st), k_smem.index(st))
        mbarrier.expect(v_bar.index(st), v_desc.block_type.nbytes)
        tma_load(v_desc, [row0 + blk * BLOCK_N, col], v_bar.index(st), v_smem.index(st))


@gluon.jit
def _ws_step(j, acc, p16, m_i, l_i, q_smem, k_smem, v_smem, k_bar, v_bar, empty, n, qh,
             qk_scale, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, s_layout: gl.constexpr,
             o_layout: gl.constexpr, p_layout: gl.constexpr, MASKED: gl.constexpr):
    """fwd_gluon._step for one consumer; the stage of block j − 1 is released to the producer."""
    st = j % STAGES
    pst = (j - 1) % STAGES
    mbarrier.wait(k_bar.index(st), (j // STAGES) & 1)
    s = warpgroup_mma(q_smem, k_smem.index(st).permute((1, 0)),
                      gl.zeros([HALF_M, BLOCK_N], gl.float32, s_layout), use_acc=False,
                      is_async=True)
    mbarrier.wait(v_bar.index(pst), ((j - 1) // STAGES) & 1)
    acc = warpgroup_mma(p16, v_smem.index(pst), acc, is_async=True)
    s = warpgroup_mma_wait(num_outstanding=1, deps=(s,))
    p, alpha, m_i, l_i = _softmax(s, m_i, l_i, qk_scale, j, qh, HALF_M, BLOCK_N, s_layout,
                                  MASKED)
    # a basic-block boundary between the softmax and the wait for P·V (see fwd_gluon._step)
    mbarrier.wait(k_bar.index((j + 1) % STAGES), ((j + 1) // STAGES) & 1, pred=j + 1 < n)
    acc, p16 = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p16))
    cta_sync()  # the partition's 4 warps are done with stage pst (one thread arrives for them)
    mbarrier.arrive(empty.index(pst), count=1)
    acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
    p16 = _handover(gl.convert_layout(p.to(q_smem.dtype), p_layout), p16,
                    q_smem.dtype == gl.bfloat16)
    return acc, p16, m_i, l_i


@gluon.jit
def _consumer(q_desc, o_desc, LSE, q_smem, q_bar, k_smem, v_smem, k_bar, v_bar, empty, qk_scale,
              T, row0, h, q0, n, pid_bh, HALF: gl.constexpr, HEAD_DIM: gl.constexpr,
              BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[CONSUMER_WARPS, 1], instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[CONSUMER_WARPS, 1], instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    qh = q0 + HALF * HALF_M           # this consumer's first row
    q_half = q_smem.index(HALF)
    bar = q_bar.index(HALF)
    mbarrier.expect(bar, q_desc.block_type.nbytes)
    tma_load(q_desc, [row0 + qh, h * HEAD_DIM], bar, q_half)
    mbarrier.wait(bar, 0)

    mbarrier.wait(k_bar.index(0), 0)
    s = warpgroup_mma(q_half, k_smem.index(0).permute((1, 0)),
                      gl.zeros([HALF_M, BLOCK_N], gl.float32, s_layout), use_acc=False,
                      is_async=True)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
    m_i = gl.full([HALF_M], -1.0e30, gl.float32, gl.SliceLayout(1, s_layout))  # finite: no NaN
    l_i = gl.zeros([HALF_M], gl.float32, gl.SliceLayout(1, s_layout))
    p, alpha, m_i, l_i = _softmax(s, m_i, l_i, qk_scale, 0, qh, HALF_M, BLOCK_N, s_layout, True)
    p16 = gl.convert_layout(p.to(q_desc.dtype), p_layout)
    acc = gl.zeros([HALF_M, HEAD_DIM], gl.float32, o_layout)

    n_full = qh // BLOCK_N           # blocks every row of this half sees whole
    for j in range(1, n_full):
        acc, p16, m_i, l_i = _ws_step(j, acc, p16, m_i, l_i, q_half, k_smem, v_smem, k_bar,
                                      v_bar, empty, n, qh, qk_scale, BLOCK_N, STAGES, s_layout,
                                      o_layout, p_layout, False)
    for j in range(gl.maximum(n_full, 1), n):
        acc, p16, m_i, l_i = _ws_step(j, acc, p16, m_i, l_i, q_half, k_smem, v_smem, k_bar,
                                      v_bar, empty, n, qh, qk_scale, BLOCK_N, STAGES, s_layout,
                                      o_layout, p_layout, True)
    last = n - 1
    mbarrier.wait(v_bar.index(last % STAGES), (last // STAGES) & 1)
    acc = warpgroup_mma(p16, v_smem.index(last % STAGES), acc, is_async=True)
    acc, p16 = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p16))

    l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))
    acc = acc / l_o[:, None]
    q_half.store(acc.to(q_desc.dtype))   # this half's Q is no longer read: it stages O
    fence_async_shared()
    tma_store(o_desc, [row0 + qh, h * HEAD_DIM], q_half)
    rows = qh + gl.arange(0, HALF_M, layout=gl.SliceLayout(1, s_layout))
    gl.store(LSE + pid_bh.to(gl.int64) * T + rows, (m_i + gl.log2(l_i)) * LN2)
    tma.store_wait(pendings=0)


@gluon.jit
def _consumer_rows_0_63(q_desc, o_desc, LSE, q_smem, q_bar, k_smem, v_smem, k_bar, v_bar, empty,
                        qk_scale, T, row0, h, q0, n, pid_bh):
    # partition entry points take runtime values only: the constants come from the descriptors
    _consumer(q_desc, o_desc, LSE, q_smem, q_bar, k_smem, v_smem, k_bar, v_bar, empty, qk_scale,
              T, row0, h, q0, n, pid_bh, 0, q_desc.block_type.shape[1],
              k_smem.shape[1], k_smem.shape[0])


@gluon.jit
def _consumer_rows_64_127(q_desc, o_desc, LSE, q_smem, q_bar, k_smem, v_smem, k_bar, v_bar,
                          empty, qk_scale, T, row0, h, q0, n, pid_bh):
    _consumer(q_desc, o_desc, LSE, q_smem, q_bar, k_smem, v_smem, k_bar, v_bar, empty, qk_scale,
              T, row0, h, q0, n, pid_bh, 1, q_desc.block_type.shape[1],
              k_smem.shape[1], k_smem.shape[0])


@gluon.jit
def _fwd_gluon_ws_kernel(q_desc, k_desc, v_desc, o_desc, LSE, qk_scale, T,
                         HQ: gl.constexpr, HKV: gl.constexpr, HEAD_DIM: gl.constexpr,
                         BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                         CONSUMER_REGS: gl.constexpr, num_warps: gl.constexpr):
    gl.static_assert(BLOCK_M == 2 * HALF_M)
    gl.static_assert(num_warps == CONSUMER_WARPS)
    q0 = (gl.num_programs(0) - 1 - gl.program_id(0)) * BLOCK_M   # heaviest tiles first
    pid_bh = gl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    hkv = h // (HQ // HKV)
    row0 = b * T
    col = hkv * HEAD_DIM
    n = (q0 + BLOCK_M) // BLOCK_N    # causal: key blocks 0 .. n−1 (the tile's last row)

    q_smem = gl.allocate_shared_memory(q_desc.dtype, [2, HALF_M, HEAD_DIM], q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    k_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(q_bar.index(i), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_bar.index(i), count=1)
        mbarrier.init(v_bar.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)   # one arrival per consumer
    fence_async_shared()

    consumer_args = (q_desc, o_desc, LSE, q_smem, q_bar, k_smem, v_smem, k_bar, v_bar, empty,
                     qk_scale, T, row0, h, q0, n, pid_bh)
    gl.warp_specialize([
        (_consumer_rows_0_63, consumer_args),
        (_consumer_rows_64_127, consumer_args),
        (_producer, (k_desc, v_desc, k_smem, v_smem, k_bar, v_bar, empty, row0, col, n)),
    ], [CONSUMER_WARPS, 1], [CONSUMER_REGS, 24])
