"""Forward kernel in Gluon for Hopper (sm_90): FlashAttention-3's warp-specialized forward, the
default flash forward on Hopper within its scope (op.fwd_kernel, FLASH_FWD_IMPL).

Partitions of one program (BLOCK_M = 128 query rows of one (batch, query head)):
  consumer 0 (the default partition, 4 warps) : rows 0..63 of the tile
  consumer 1 (worker, 4 warps)                : rows 64..127
  producer   (worker, 1 warp)                 : TMA loads of every K/V block into the ring
Each consumer walks its 64 rows with the softmax of key block j overlapping its own P·V product
of block j − 1 (intra-warpgroup pipelining, fwd_step) and writes its O half and lse. The stage ring
is guarded by mbarriers both ways: `ready` (TMA completion, per K and per V tile) and `empty`
(count 2: each consumer arrives once it has read a stage), so the consumers never wait for each
other: their softmax and product phases drift apart and interleave on the tensor cores (FA3's
ping-pong, not enforced); the loop's only barriers are each consumer's own (128-thread named
barriers), none across the warpgroups.

Memory plan: shared Q 2 x [64, D] (also the staging tiles of the O stores), STAGES x K and V
[BLOCK_N, D]; registers per consumer thread: O [64, D] fp32 / 128 threads, S [64, BLOCK_N] fp32,
P of block j − 1 16-bit (the wgmma's register A operand, read by the product in flight).
HBM writes: O once (TMA store), lse once.

Positions and masking: query row i is at q_offset + i, keys at 0..Tk−1; row p sees the keys
lo(p) <= s <= p, s < Tk, lo(p) = max(document start of p, p − window + 1, 0) (causal=False is
q_offset = Tk − 1, see op._kernel_offset). The program walks key blocks j0 .. n−1: from the block
of its first row's lo to the block of its last row (clamped to Tk); both consumers walk the same
blocks (a block a consumer's rows cannot see gives p = 0 and is still read and released). Per
consumer, blocks that every one of its rows sees whole skip the mask; the others (first block,
document or window edge, diagonal, past Tk) are masked. Scores in the log2 domain; the row max
is taken on the raw scores and scaled once per row.

Scope (fwd_gluon's checks; the op takes the Triton forward outside it unless FLASH_FWD_IMPL=gluon
demands this one): a Hopper GPU, bf16 / fp16, D 64 or 128, Tq a multiple of 128 when B > 1.

Pooled keys (POOLED, pooled_fwd_gluon): the same kernel with each row's key range [lo, hi) read
from an array instead of the masks above; NSA's compressed-branch forward under
NSA_CMP_IMPL=gluon (attn/nsa/cmp.py).
"""
from __future__ import annotations

import functools

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                              warpgroup_mma, warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from attn.common import alloc
from attn.common.jit import LOG2E_F
from attn.common.launch import device_capability

# names that moved between triton 3.6 (the GPU image) and 3.9: a partition-wide barrier, TMA
cta_sync = gl.thread_barrier if hasattr(gl, "thread_barrier") else gl.barrier
tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared
tma_store = tma.async_store if hasattr(tma, "async_store") else tma.async_copy_shared_to_global
LN2 = gl.constexpr(0.6931471805599453)  # ln(2): lse leaves the log2 domain
HALF_M = gl.constexpr(64)     # rows per consumer warpgroup (one wgmma M tile)
CONSUMER_WARPS = gl.constexpr(4)


@gluon.constexpr_function
def mma_layout(n):
    """The wgmma accumulator layout of a consumer warpgroup's [64, n] tile: warps along M (16
    rows each), one instruction spans n."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[CONSUMER_WARPS.value, 1],
                                     instr_shape=[16, n, 16])


@gluon.jit
def _handover(new, old, BF16: gl.constexpr):
    """new + 0·old, two 16-bit values per register: an instruction ptxas sees reading old's
    registers, so they stay live up to this point (probabilities: finite and >= 0, so the sum is
    new exactly). One packed FMA per register pair."""
    if BF16:
        asm: gl.constexpr = "{.reg .b32 z; mov.b32 z, 0; fma.rn.bf16x2 $0, $2, z, $1;}"
    else:
        asm: gl.constexpr = "{.reg .b32 z; mov.b32 z, 0; fma.rn.f16x2 $0, $2, z, $1;}"
    return gl.inline_asm_elementwise(asm, "=r,r,r", [new, old], dtype=new.dtype, is_pure=True,
                                     pack=2)


@gluon.jit
def online_softmax(s, m_i, l_i, qk_scale, j, qpos, lo, Tk, BLOCK_N: gl.constexpr,
             s_layout: gl.constexpr, MASKED: gl.constexpr):
    """Online-softmax update on raw scores s of key block j: (p fp32, alpha, m_new, l_new)."""
    if MASKED:
        kpos = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        ok = (kpos[None, :] <= qpos[:, None]) & (kpos[None, :] >= lo[:, None]) \
            & (kpos[None, :] < Tk)
        s = gl.where(ok, s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
    p = gl.exp2(s * qk_scale - m_new[:, None])
    alpha = gl.exp2(m_i - m_new)
    l_new = l_i * alpha + gl.sum(p, axis=1)
    return p, alpha, m_new, l_new


@gluon.jit
def fwd_step(j, j0, n, acc, p16, m_i, l_i, q_smem, k_smem, v_smem, k_bar, v_bar, empty, qpos, lo,
          Tk, qk_scale, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, s_layout: gl.constexpr,
          p_layout: gl.constexpr, o_layout: gl.constexpr, MASKED: gl.constexpr):
    """Key block j (ring slot j − j0): wait K_j; issue S_j = Q·K_jᵀ; issue O += P_{j−1}·V_{j−1};
    wait for S_j only (wgmma groups retire in order, so O's product stays in flight); softmax of
    S_j; wait for the product; release the stage of block j − 1 to the producer; rescale O."""
    r = j - j0
    st = r % STAGES
    pst = (r - 1) % STAGES
    mbarrier.wait(k_bar.index(st), (r // STAGES) & 1)
    s = warpgroup_mma(q_smem, k_smem.index(st).permute((1, 0)),
                      gl.zeros([HALF_M, BLOCK_N], gl.float32, s_layout), use_acc=False,
                      is_async=True)
    mbarrier.wait(v_bar.index(pst), ((r - 1) // STAGES) & 1)
    acc = warpgroup_mma(p16, v_smem.index(pst), acc, is_async=True)
    s = warpgroup_mma_wait(num_outstanding=1, deps=(s,))       # S_j done, P·V still running
    p, alpha, m_i, l_i = online_softmax(s, m_i, l_i, qk_scale, j, qpos, lo, Tk, BLOCK_N, s_layout,
                                  MASKED)
    # K_{j+1}'s barrier (needed next step anyway) closes a basic block here: ptxas schedules
    # within blocks, so the softmax cannot be moved below the wait for P·V that follows
    mbarrier.wait(k_bar.index((r + 1) % STAGES), ((r + 1) // STAGES) & 1, pred=j + 1 < n)
    acc, p16 = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p16))
    cta_sync()  # every warp of this consumer is done with stage pst
    mbarrier.arrive(empty.index(pst), count=1)  # one elected arrive for the partition
    acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
    # P_{j−1}'s registers are read by the product in flight until the wait above: handing them
    # over only here keeps ptxas from giving them to the softmax (it would, and then wait for
    # P·V before the softmax, which undoes the overlap)
    p16 = _handover(gl.convert_layout(p.to(q_smem.dtype), p_layout), p16,
                    q_smem.dtype == gl.bfloat16)
    return acc, p16, m_i, l_i


@gluon.jit
def _attend_rows(q_smem, o_desc, LSE, SEG, k_smem, v_smem, k_bar, v_bar, empty, row_q, h, qh,
                 j0, n, pid_bh, Tq, Tk, q_offset, window, has_seg, qk_scale,
                 BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
                 POOLED: gl.constexpr):
    """The 64 rows at qh (of Tq) once their Q tile is in q_smem: block j0, the steps over
    j0 + 1 .. n − 1 in three ranges (masked, whole, masked), the last P·V, then O (through
    q_smem, by TMA) and lse stored. POOLED: the kernel docstring's pooled-key mode."""
    s_layout: gl.constexpr = mma_layout(BLOCK_N)
    o_layout: gl.constexpr = mma_layout(HEAD_DIM)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)

    rows = qh + gl.arange(0, HALF_M, layout=gl.SliceLayout(1, s_layout))
    row_ok = rows < Tq
    if POOLED:
        # each row's keys [lo, hi) from SEG; the mask's "key <= qpos" is then "key < hi"
        lo = gl.load(SEG + rows, mask=row_ok, other=0)
        hi = gl.load(SEG + Tq + rows, mask=row_ok, other=0)
        qpos = hi - 1
        lo_last = gl.max(gl.where(row_ok, lo, 0), axis=0)
        hi_first = gl.min(gl.where(row_ok, hi, Tk), axis=0)
        f_lo = gl.minimum(gl.maximum(gl.cdiv(lo_last, BLOCK_N), j0 + 1), n)
        f_hi = gl.maximum(gl.minimum(hi_first // BLOCK_N, n), f_lo)
    else:
        qpos = q_offset + rows
        lo = gl.maximum(qpos - window + 1, 0)
        lo = gl.maximum(lo, gl.load(SEG + qpos, mask=row_ok & (has_seg != 0), other=0))
        # [j0 + 1, f_lo) masked (document / window edge), [f_lo, f_hi) whole, [f_hi, n) masked
        # (diagonal, past Tk)
        lo_last = gl.max(gl.where(row_ok, lo, 0), axis=0)
        f_lo = gl.minimum(gl.maximum(gl.cdiv(lo_last, BLOCK_N), j0 + 1), n)
        f_hi = gl.maximum(gl.minimum((q_offset + qh + 1) // BLOCK_N, Tk // BLOCK_N), f_lo)

    # block j0 (ring slot 0): S and its softmax, no P·V yet
    mbarrier.wait(k_bar.index(0), 0)
    s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)),
                      gl.zeros([HALF_M, BLOCK_N], gl.float32, s_layout), use_acc=False,
                      is_async=True)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
    m_i = gl.full([HALF_M], -1.0e30, gl.float32, gl.SliceLayout(1, s_layout))  # finite: no NaN
    l_i = gl.zeros([HALF_M], gl.float32, gl.SliceLayout(1, s_layout))
    p, alpha, m_i, l_i = online_softmax(s, m_i, l_i, qk_scale, j0, qpos, lo, Tk, BLOCK_N, s_layout,
                                  True)
    p16 = gl.convert_layout(p.to(q_smem.dtype), p_layout)
    acc = gl.zeros([HALF_M, HEAD_DIM], gl.float32, o_layout)

    for j in range(j0 + 1, f_lo):
        acc, p16, m_i, l_i = fwd_step(j, j0, n, acc, p16, m_i, l_i, q_smem, k_smem, v_smem, k_bar,
                                   v_bar, empty, qpos, lo, Tk, qk_scale, BLOCK_N, STAGES,
                                   s_layout, p_layout, o_layout, True)
    for j in range(f_lo, f_hi):
        acc, p16, m_i, l_i = fwd_step(j, j0, n, acc, p16, m_i, l_i, q_smem, k_smem, v_smem, k_bar,
                                   v_bar, empty, qpos, lo, Tk, qk_scale, BLOCK_N, STAGES,
                                   s_layout, p_layout, o_layout, False)
    for j in range(f_hi, n):
        acc, p16, m_i, l_i = fwd_step(j, j0, n, acc, p16, m_i, l_i, q_smem, k_smem, v_smem, k_bar,
                                   v_bar, empty, qpos, lo, Tk, qk_scale, BLOCK_N, STAGES,
                                   s_layout, p_layout, o_layout, True)

    # the last block's P·V (its stage needs no release: the producer is done)
    last = n - 1 - j0
    mbarrier.wait(v_bar.index(last % STAGES), (last // STAGES) & 1)
    acc = warpgroup_mma(p16, v_smem.index(last % STAGES), acc, is_async=True)
    acc, p16 = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p16))

    # l > 0 on every row < Tq (it sees its own key; pooled: unless its range is empty, then
    # o = 0 and lse = +inf); rows past Tq are never stored
    l_safe = gl.where(l_i > 0.0, l_i, 1.0)
    acc = acc / gl.convert_layout(l_safe, gl.SliceLayout(1, o_layout))[:, None]
    q_smem.store(acc.to(q_smem.dtype))   # Q is no longer read: its tile stages O
    fence_async_shared()
    tma_store(o_desc, [row_q + qh, h * HEAD_DIM], q_smem)
    lse = (m_i + gl.log2(l_safe)) * LN2
    if POOLED:
        lse = gl.where(l_i > 0.0, lse, float("inf"))
    gl.store(LSE + pid_bh.to(gl.int64) * Tq + rows, lse, mask=row_ok)
    tma.store_wait(pendings=0)


@gluon.jit
def kv_ring(k_desc, v_desc, STAGES: gl.constexpr):
    """The K/V stage ring in shared memory, STAGES x [BLOCK_N, D] each (the descriptors' tiles),
    with its barriers initialised: k_bar, v_bar (TMA completion), empty (one arrival per
    consumer). The caller fences before the partitions start."""
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape,
                                       k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape,
                                       v_desc.layout)
    k_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(k_bar.index(i), count=1)
        mbarrier.init(v_bar.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)   # one arrival per consumer
    return k_smem, v_smem, k_bar, v_bar, empty


@gluon.jit
def kv_load(k_desc, v_desc, k_smem, v_smem, k_bar, v_bar, empty, r, row, col):
    """The K, V tiles at (row, col) by TMA into ring slot r (stage r % STAGES) once both
    consumers have released the slot's previous use (r − STAGES)."""
    STAGES: gl.constexpr = k_smem.shape[0]
    st = r % STAGES
    mbarrier.wait(empty.index(st), ((r // STAGES) + 1) & 1, pred=r >= STAGES)
    mbarrier.expect(k_bar.index(st), k_desc.block_type.nbytes)
    tma_load(k_desc, [row, col], k_bar.index(st), k_smem.index(st))
    mbarrier.expect(v_bar.index(st), v_desc.block_type.nbytes)
    tma_load(v_desc, [row, col], v_bar.index(st), v_smem.index(st))


@gluon.jit
def _producer(k_desc, v_desc, k_smem, v_smem, k_bar, v_bar, empty, row_k, col, j0, n):
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    for j in range(j0, n):
        kv_load(k_desc, v_desc, k_smem, v_smem, k_bar, v_bar, empty, j - j0, row_k + j * BLOCK_N,
                col)


@gluon.jit
def _consumer(q_desc, o_desc, LSE, SEG, q_smem, q_bar, k_smem, v_smem, k_bar, v_bar, empty,
              qk_scale, Tq, Tk, q_offset, window, has_seg, row_q, h, q0, j0, n, pid_bh,
              HALF: gl.constexpr, POOLED: gl.constexpr):
    HEAD_DIM: gl.constexpr = q_desc.block_type.shape[1]
    qh = q0 + HALF * HALF_M           # this consumer's first row
    q_half = q_smem.index(HALF)
    bar = q_bar.index(HALF)
    mbarrier.expect(bar, q_desc.block_type.nbytes)
    tma_load(q_desc, [row_q + qh, h * HEAD_DIM], bar, q_half)
    mbarrier.wait(bar, 0)
    _attend_rows(q_half, o_desc, LSE, SEG, k_smem, v_smem, k_bar, v_bar, empty, row_q, h, qh,
                 j0, n, pid_bh, Tq, Tk, q_offset, window, has_seg, qk_scale, k_smem.shape[1],
                 HEAD_DIM, k_smem.shape[0], POOLED)


# partition entry points take runtime values only (the constants come from the descriptors and
# shared-memory shapes), so each consumer half (and mode) has its own
@gluon.jit
def _consumer_rows_0_63(q_desc, o_desc, LSE, SEG, q_smem, q_bar, k_smem, v_smem, k_bar, v_bar,
                        empty, qk_scale, Tq, Tk, q_offset, window, has_seg, row_q, h, q0, j0, n,
                        pid_bh):
    _consumer(q_desc, o_desc, LSE, SEG, q_smem, q_bar, k_smem, v_smem, k_bar, v_bar, empty,
              qk_scale, Tq, Tk, q_offset, window, has_seg, row_q, h, q0, j0, n, pid_bh, 0, False)


@gluon.jit
def _consumer_rows_64_127(q_desc, o_desc, LSE, SEG, q_smem, q_bar, k_smem, v_smem, k_bar, v_bar,
                          empty, qk_scale, Tq, Tk, q_offset, window, has_seg, row_q, h, q0, j0,
                          n, pid_bh):
    _consumer(q_desc, o_desc, LSE, SEG, q_smem, q_bar, k_smem, v_smem, k_bar, v_bar, empty,
              qk_scale, Tq, Tk, q_offset, window, has_seg, row_q, h, q0, j0, n, pid_bh, 1, False)


@gluon.jit
def _pooled_rows_0_63(q_desc, o_desc, LSE, SEG, q_smem, q_bar, k_smem, v_smem, k_bar, v_bar,
                      empty, qk_scale, Tq, Tk, q_offset, window, has_seg, row_q, h, q0, j0, n,
                      pid_bh):
    _consumer(q_desc, o_desc, LSE, SEG, q_smem, q_bar, k_smem, v_smem, k_bar, v_bar, empty,
              qk_scale, Tq, Tk, q_offset, window, has_seg, row_q, h, q0, j0, n, pid_bh, 0, True)


@gluon.jit
def _pooled_rows_64_127(q_desc, o_desc, LSE, SEG, q_smem, q_bar, k_smem, v_smem, k_bar, v_bar,
                        empty, qk_scale, Tq, Tk, q_offset, window, has_seg, row_q, h, q0, j0, n,
                        pid_bh):
    _consumer(q_desc, o_desc, LSE, SEG, q_smem, q_bar, k_smem, v_smem, k_bar, v_bar, empty,
              qk_scale, Tq, Tk, q_offset, window, has_seg, row_q, h, q0, j0, n, pid_bh, 1, True)


@gluon.jit
def _fwd_gluon_kernel(q_desc, k_desc, v_desc, o_desc, LSE, SEG, qk_scale, Tq, Tk, q_offset,
                      window, has_seg, HQ: gl.constexpr, HKV: gl.constexpr,
                      HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                      STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                      PRODUCER_REGS: gl.constexpr, num_warps: gl.constexpr,
                      POOLED: gl.constexpr = False):
    """POOLED (NSA's compressed branch, attn/nsa/cmp.py): the keys are pooled blocks, and query
    row i sees the keys [lo(i), hi(i)) given as int32 SEG[i], SEG[Tq + i] (both non-decreasing
    in i; q_offset, window and has_seg unused); a row with an empty range gets o = 0, lse = +inf.
    Otherwise the module docstring's masks."""
    gl.static_assert(BLOCK_M == 2 * HALF_M)
    gl.static_assert(num_warps == CONSUMER_WARPS)
    q0 = (gl.num_programs(0) - 1 - gl.program_id(0)) * BLOCK_M   # heaviest tiles first
    pid_bh = gl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    hkv = h // (HQ // HKV)
    row_q = b * Tq                   # first row of this batch in the [B·T, H·D] views
    row_k = b * Tk
    col = hkv * HEAD_DIM
    if POOLED:
        # key blocks from the first row's lo to the last row's hi; at least one (rows that see
        # nothing run one block fully masked)
        j0 = gl.load(SEG + q0) // BLOCK_N
        n = gl.maximum(gl.cdiv(gl.load(SEG + Tq + gl.minimum(q0 + BLOCK_M, Tq) - 1), BLOCK_N),
                       j0 + 1)
    else:
        # key blocks j0 .. n − 1: from the first row's lo to the last row (module docstring)
        q_first = q_offset + q0
        lo_first = gl.maximum(q_first - window + 1, 0)
        lo_first = gl.maximum(lo_first, gl.load(SEG + q_first, mask=has_seg != 0, other=0))
        j0 = lo_first // BLOCK_N
        n = gl.cdiv(gl.minimum(q_offset + gl.minimum(q0 + BLOCK_M, Tq), Tk), BLOCK_N)

    q_smem = gl.allocate_shared_memory(q_desc.dtype, [2, HALF_M, HEAD_DIM], q_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(q_bar.index(i), count=1)
    k_smem, v_smem, k_bar, v_bar, empty = kv_ring(k_desc, v_desc, STAGES)
    fence_async_shared()

    consumer_args = (q_desc, o_desc, LSE, SEG, q_smem, q_bar, k_smem, v_smem, k_bar, v_bar, empty,
                     qk_scale, Tq, Tk, q_offset, window, has_seg, row_q, h, q0, j0, n, pid_bh)
    producer_args = (k_desc, v_desc, k_smem, v_smem, k_bar, v_bar, empty, row_k, col, j0, n)
    if POOLED:
        gl.warp_specialize([
            (_pooled_rows_0_63, consumer_args),
            (_pooled_rows_64_127, consumer_args),
            (_producer, producer_args),
        ], [CONSUMER_WARPS, 1], [CONSUMER_REGS, PRODUCER_REGS])
    else:
        gl.warp_specialize([
            (_consumer_rows_0_63, consumer_args),
            (_consumer_rows_64_127, consumer_args),
            (_producer, producer_args),
        ], [CONSUMER_WARPS, 1], [CONSUMER_REGS, PRODUCER_REGS])


# launch

# (BLOCK_M, BLOCK_N, STAGES) per head dim. Shared memory: Q 128 x D + STAGES x (K + V) BLOCK_N x D,
# 16-bit: 224 KB at D = 128 (of 227), 144 KB at D = 64; fastest of the H200 sweep
# (docs/flash_notes.md, run 17). STAGES >= 3: a consumer holds stage j − 1 (its P·V in flight)
# while it waits for K_{j+1}.
GLUON_CFG = {64: (128, 128, 4), 128: (128, 128, 3)}
# registers per thread after setmaxnreg: 2 x 128 consumer threads x 240 + 32 producer threads
# x 24 = 62208 of the SM's 65536 (ptxas spills one value with 128-key blocks: D = 64 on triton
# 3.6, D = 128 on 3.9; tests/attn/flash/gluon_aot.py allows that one)
CONSUMER_REGS, PRODUCER_REGS = 240, 24
NO_WINDOW = 1 << 30  # a window no sequence reaches: lo = 0


def scope_error(q, k) -> str | None:
    """Why the Gluon forward cannot run (q, k) (checked inputs of flash_fwd), or None."""
    B, tq, _, d = q.shape
    if not q.is_cuda or device_capability(q.device.index)[0] != 9:
        return "the Gluon flash forward needs a Hopper GPU (sm_90)"
    if q.dtype not in (torch.bfloat16, torch.float16) or d not in GLUON_CFG:
        return f"the Gluon flash forward takes bf16/fp16 and D in {sorted(GLUON_CFG)}; got " \
               f"{q.dtype}, D={d}"
    if B > 1 and tq % GLUON_CFG[d][0]:
        return f"the Gluon flash forward needs Tq a multiple of {GLUON_CFG[d][0]} when B > 1 " \
               f"(a tile must not run into the next batch); got B={B}, Tq={tq}"
    return None


@functools.lru_cache(maxsize=None)
def _tile_layout(rows: int, d: int, bf16: bool):
    """The default swizzled shared layout of a [rows, d] 16-bit tile (an immutable value, built
    once: ~13 µs of host time per descriptor otherwise)."""
    return gl.NVMMASharedLayout.get_default_for([rows, d], gl.bfloat16 if bf16 else gl.float16)


def tile_desc(t, rows: int):
    """TMA descriptor of a [B, T, H, D] 16-bit tensor viewed as [B·T, H·D], tiles of [rows, D]
    in the default swizzled shared layout: a contiguous tensor, or a view whose (B, T) and
    (H, D) dims merge (MoBA's head pieces, attn/moba/heads.py: the full tensor's token stride)."""
    B, T, H, d = t.shape
    t2 = t.view(B * T, H * d)
    return TensorDescriptor(t2, list(t2.shape), list(t2.stride()), [rows, d],
                            _tile_layout(rows, d, t.dtype == torch.bfloat16))


def mask_args(seg, window, lse):
    """(SEG pointer, window, has_seg) kernel arguments of the Gluon kernels: without documents
    the lse buffer stands in for SEG (never read), without a window NO_WINDOW."""
    has_seg = seg is not None
    return (seg if has_seg else lse.view(torch.int32), NO_WINDOW if window is None else window,
            int(has_seg))


def fwd_gluon(q, k, v, scale, seg_start=None, q_offset=0, window=None, block_n=None,
              stages=None):
    """(o, lse) of op.fwd_kernel's contract (seg_start: each key position's document start,
    int32 [Tk]; q_offset, window as there) through the Gluon kernel; ValueError outside its
    scope. block_n, stages: tuning overrides."""
    why = scope_error(q, k)
    if why is not None:
        raise ValueError(why)
    bn, st = GLUON_CFG[q.shape[-1]][1:]
    bn, st = block_n or bn, stages or st
    if st < 3 or bn not in (32, 64, 128):
        raise ValueError(f"the Gluon flash forward needs STAGES >= 3 and BLOCK_N in 32/64/128; "
                         f"got STAGES={st}, BLOCK_N={bn}")
    return _launch(q, k, v, scale, seg_start, q_offset, window, bn, st, False)


def pooled_fwd_gluon(q, k, v, scale, bounds):
    """(o, lse) of attention over pooled keys (k, v [B, Tk, Hkv, D]: NSA's compressed rows,
    attn/nsa/cmp.py's contract): query row i sees the keys [bounds[0, i], bounds[1, i]) (int32
    [2, Tq], both non-decreasing in i); a row with an empty range gets o = 0, lse = +inf.
    ValueError outside scope_error's scope."""
    why = scope_error(q, k)
    if why is not None:
        raise ValueError(why)
    tq = q.shape[1]
    if bounds.shape != (2, tq) or bounds.dtype != torch.int32 or not bounds.is_contiguous():
        raise ValueError(f"pooled key bounds must be a contiguous int32 [2, Tq] = [2, {tq}] "
                         f"tensor, got {bounds.dtype} {tuple(bounds.shape)}")
    bn, st = GLUON_CFG[q.shape[-1]][1:]
    return _launch(q, k, v, scale, bounds, 0, None, bn, st, True)


def _launch(q, k, v, scale, seg, q_offset, window, bn, st, pooled):
    B, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    bm = GLUON_CFG[d][0]
    q, k, v = (t.contiguous() for t in (q, k, v))
    o = alloc.empty(q.shape, q.dtype, q.device)
    lse = alloc.empty((B, hq, tq), torch.float32, q.device)
    seg, win, has_seg = mask_args(seg, window, lse)
    _fwd_gluon_kernel[(triton.cdiv(tq, bm), B * hq)](
        tile_desc(q, HALF_M.value), tile_desc(k, bn), tile_desc(v, bn), tile_desc(o, HALF_M.value),
        lse, seg, scale * LOG2E_F, tq, tk, q_offset, win, has_seg, HQ=hq, HKV=hkv, HEAD_DIM=d,
        BLOCK_M=bm, BLOCK_N=bn, STAGES=st, CONSUMER_REGS=CONSUMER_REGS,
        PRODUCER_REGS=PRODUCER_REGS, num_warps=CONSUMER_WARPS, POOLED=pooled)
    return o, lse
