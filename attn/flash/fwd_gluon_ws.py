"""Warp-specialized variant of the Gluon forward (fwd_gluon.py), FLASH_FWD_IMPL=gluon-ws:
FlashAttention-3's producer / consumer split on Hopper.

Partitions of one program (BLOCK_M = 128 query rows of one (batch, query head)):
  consumer 0 (the default partition, 4 warps) : rows 0..63 of the tile
  consumer 1 (worker, 4 warps)                : rows 64..127
  producer   (worker, 1 warp, 24 registers)   : TMA loads of every K/V block into the ring
Each consumer runs fwd_gluon's _step (WS=True) on its own 64 rows (Q half, S, P, O in its
registers: the softmax of block j while its P·V product of block j − 1 runs) and writes its own O
half and lse. The stage ring is guarded by mbarriers both ways: `ready` (TMA completion, per K and
per V tile) and `empty` (count 2: each consumer arrives once it has read a stage), so the two
consumers never wait for each other: their softmax and product phases drift apart and interleave on
the tensor cores (FA3's ping-pong, not enforced here); the loop's only barriers are the
consumer's own (128-thread named barriers), none across the warpgroups.
Memory plan: shared Q 2 x [64, D] (also the staging tiles of the O stores), STAGES x K and V
[BLOCK_N, D]; registers per consumer thread: O [64, D] fp32 / 128 threads, S [64, BLOCK_N] fp32,
P 16-bit. Masking: consumer c's rows start at q0 + 64c; key blocks at or past that start take
the causal mask (a block wholly above the diagonal for these rows gives p = 0 and is still read
and released, so both consumers walk the same blocks). Scope: fwd_gluon's.
"""
from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier

from attn.flash.fwd_gluon import _attend_rows, prepare, tma_load

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
def _consumer(q_desc, o_desc, LSE, q_smem, q_bar, k_smem, v_smem, k_bar, v_bar, empty, qk_scale,
              T, row0, h, q0, n, pid_bh, HALF: gl.constexpr, HEAD_DIM: gl.constexpr,
              BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    qh = q0 + HALF * HALF_M           # this consumer's first row
    q_half = q_smem.index(HALF)
    bar = q_bar.index(HALF)
    mbarrier.expect(bar, q_desc.block_type.nbytes)
    tma_load(q_desc, [row0 + qh, h * HEAD_DIM], bar, q_half)
    mbarrier.wait(bar, 0)
    # the descriptors stand in for the K/V ones: with WS the consumers never load K/V
    _attend_rows(q_half, o_desc, LSE, k_smem, v_smem, k_bar, v_bar, empty, q_desc, q_desc, row0,
                 0, h, qh, n, pid_bh, T, qk_scale, HALF_M, BLOCK_N, HEAD_DIM, STAGES,
                 CONSUMER_WARPS, True)


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


# launch

# (BLOCK_M, BLOCK_N, STAGES) per head dim (at D = 64 a 128-key tile leaves the 24-register
# producer 8 bytes of stack with triton 3.6), and the registers per consumer thread after the
# producer warp gives its own back (setmaxnreg; Triton balances the default partition to match)
GLUON_WS_CFG = {64: (128, 64, 4), 128: (128, 64, 3)}
WS_CONSUMER_REGS = 240


def fwd_gluon_ws(q, k, v, scale, block_n=None, stages=None):
    """(o, lse) of causal attention through the warp-specialized Gluon kernel (fwd_gluon's
    scope and checks)."""
    o, lse, args, meta, grid = prepare(q, k, v, scale, GLUON_WS_CFG, 2, block_n, stages)
    _fwd_gluon_ws_kernel[grid](*args, **meta, CONSUMER_REGS=WS_CONSUMER_REGS,
                               num_warps=CONSUMER_WARPS)
    return o, lse
