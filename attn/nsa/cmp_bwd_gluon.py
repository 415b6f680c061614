"""NSA compressed branch, dK/dV in Gluon for Hopper: the flash dK/dV kernel's partitions
(attn/flash/bwd_gluon.py) over pooled keys, under NSA_CMP_IMPL=gluon (attn/nsa/cmp.py; the dQ
kernel and the exact delta stay cmp_bwd.py's).

One program = 128 compressed rows (keys) of one (batch, KV head) and one split of the query rows
(cmp_bwd.py's splits: the first compressed rows are seen by nearly every query, so the rows are
cut into chunks until the grid is wide enough). Partitions and the per-block step are
bwd_gluon.py's: two consumer warpgroups of 64 keys each (K, V in shared memory, dK, dV fp32 in
registers), a 1-warp producer streaming (Q, dO) blocks of every query head of the GQA group.

Masking (cmp_plan.py, key side): compressed row c is seen by the query positions
[pf(c), pl(c)] (its block's last key .. its document's last position), given as int32 arrays
PFL[c], PFL[Tc + c] (cmp_plan.key_bounds); bwd_gluon's step masks "position >= kpos and <= hi"
per key, so pf stands in for kpos and pl for hi. Unused rows of a padded layout have the empty
range [2^30, −1]. The program's query blocks run from pf(first key) to the largest pl of the
tile, clipped to its split; per consumer the blocks every (key, row) pair sees whole skip the
mask.

Output: fp32 partials [splits, B, Tc, Hkv, D] written by plain stores from registers (one writer
per element, zeros where a split sees nothing), summed in a fixed order on the host:
deterministic. Scope: fwd_gluon.scope_error's (Hopper, 16-bit, D 64 / 128, Tq a multiple of 128
when B > 1); any Tc (key tiles past Tc read the next batch's rows, masked, and the partial stores
are masked: no TMA store runs into the next batch).
"""
from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from attn.common import alloc
from attn.common.jit import LOG2E_F
from attn.flash.bwd_gluon import DKDV_CFG, HALF_N, dkdv_heads, dkdv_ring, kv_half, qdo_producer
from attn.flash.fwd_gluon import (CONSUMER_REGS, CONSUMER_WARPS, PRODUCER_REGS, mma_layout,
                                  scope_error, tile_desc)
from attn.nsa.cmp_plan import BIG, dkdv_chunk, key_bounds


@gluon.jit
def _consumer(k_desc, v_desc, LSE, DELTA, PFL, DK, DV, q_smem, do_smem, k_smem, v_smem, kv_bar,
              ready, empty, qk_scale, scale, Tq, Tc, q_offset, hq, group, row_k, k0, col, b, hkv,
              z, n_b, m_lo, m_hi, HALF: gl.constexpr):
    HEAD_DIM: gl.constexpr = k_desc.block_type.shape[1]
    BLOCK_M: gl.constexpr = q_smem.shape[1]
    s_layout: gl.constexpr = mma_layout(BLOCK_M)
    o_layout: gl.constexpr = mma_layout(HEAD_DIM)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    kc = k0 + HALF * HALF_N            # this consumer's first key
    k_c, v_c = kv_half(k_desc, v_desc, k_smem, v_smem, kv_bar, row_k, kc, col, HALF)

    # per key the positions [pf, pl] that see it; keys past Tc: the empty range
    keys = kc + gl.arange(0, HALF_N, layout=gl.SliceLayout(1, s_layout))
    k_ok = keys < Tc
    pf = gl.load(PFL + keys, mask=k_ok, other=BIG)
    pl = gl.load(PFL + Tc + keys, mask=k_ok, other=-1)
    # query blocks [m_lo, f_lo) masked, [f_lo, f_hi) whole, [f_hi, m_hi) masked
    f_lo = gl.minimum(gl.maximum(gl.cdiv(gl.maximum(gl.max(pf, axis=0) - q_offset, 0), BLOCK_M),
                                 m_lo), m_hi)
    f_hi = gl.minimum(gl.maximum(gl.minimum(gl.min(pl, axis=0) - q_offset + 1, Tq) // BLOCK_M,
                                 f_lo), m_hi)

    dk = gl.zeros([HALF_N, HEAD_DIM], gl.float32, o_layout)
    dv = gl.zeros([HALF_N, HEAD_DIM], gl.float32, o_layout)
    dk, dv = dkdv_heads(dk, dv, k_c, v_c, q_smem, do_smem, ready, empty, LSE, DELTA, pf, pl,
                        q_offset, Tq, qk_scale, b, hq, hkv, group, m_lo, f_lo, f_hi, m_hi,
                        s_layout, p_layout)

    # this split's fp32 partials [splits, B, Tc, Hkv, D]: int64 base of the (split, batch, key
    # tile), int32 offsets inside it
    hkv_n = hq // group
    base = (((z * n_b + b).to(gl.int64) * Tc + kc) * hkv_n + hkv) * HEAD_DIM
    r = gl.arange(0, HALF_N, layout=gl.SliceLayout(1, o_layout))
    d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    offs = r[:, None] * (hkv_n * HEAD_DIM) + d[None, :]
    ok = (kc + r < Tc)[:, None]
    gl.store(DK + base + offs, dk * scale, mask=ok)
    gl.store(DV + base + offs, dv, mask=ok)


# partition entry points take runtime values only (bwd_gluon.py), one per consumer half
@gluon.jit
def _consumer_keys_0_63(k_desc, v_desc, LSE, DELTA, PFL, DK, DV, q_smem, do_smem, k_smem, v_smem,
                        kv_bar, ready, empty, qk_scale, scale, Tq, Tc, q_offset, hq, group, row_k,
                        k0, col, b, hkv, z, n_b, m_lo, m_hi):
    _consumer(k_desc, v_desc, LSE, DELTA, PFL, DK, DV, q_smem, do_smem, k_smem, v_smem, kv_bar,
              ready, empty, qk_scale, scale, Tq, Tc, q_offset, hq, group, row_k, k0, col, b, hkv,
              z, n_b, m_lo, m_hi, 0)


@gluon.jit
def _consumer_keys_64_127(k_desc, v_desc, LSE, DELTA, PFL, DK, DV, q_smem, do_smem, k_smem,
                          v_smem, kv_bar, ready, empty, qk_scale, scale, Tq, Tc, q_offset, hq,
                          group, row_k, k0, col, b, hkv, z, n_b, m_lo, m_hi):
    _consumer(k_desc, v_desc, LSE, DELTA, PFL, DK, DV, q_smem, do_smem, k_smem, v_smem, kv_bar,
              ready, empty, qk_scale, scale, Tq, Tc, q_offset, hq, group, row_k, k0, col, b, hkv,
              z, n_b, m_lo, m_hi, 1)


@gluon.jit
def _pooled_dkdv_kernel(q_desc, k_desc, v_desc, do_desc, LSE, DELTA, PFL, DK, DV, qk_scale,
                        scale, Tq, Tc, q_offset, hq, group, n_b, chunk_blocks,
                        HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                        STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                        PRODUCER_REGS: gl.constexpr, num_warps: gl.constexpr):
    gl.static_assert(BLOCK_N == 2 * HALF_N)
    gl.static_assert(num_warps == CONSUMER_WARPS)
    k0 = gl.program_id(0) * BLOCK_N    # the first compressed rows see the most queries
    pid_bh = gl.program_id(1)
    z = gl.program_id(2)               # the split of the query rows
    hkv_n = hq // group
    b = pid_bh // hkv_n
    hkv = pid_bh % hkv_n
    row_q = b * Tq                     # first row of this batch in the [B·T, H·D] views
    row_k = b * Tc
    col = hkv * HEAD_DIM
    # query blocks: from pf(first key) to the tile's largest pl, clipped to this split
    keys = k0 + gl.arange(0, BLOCK_N, layout=gl.BlockedLayout([1], [32], [num_warps], [0]))
    pl_max = gl.max(gl.load(PFL + Tc + keys, mask=keys < Tc, other=-1), axis=0)
    m_lo = gl.maximum(gl.maximum(gl.load(PFL + k0) - q_offset, 0) // BLOCK_M, z * chunk_blocks)
    m_hi = gl.minimum(gl.cdiv(gl.minimum(pl_max - q_offset + 1, Tq), BLOCK_M),
                      (z + 1) * chunk_blocks)
    m_hi = gl.maximum(m_hi, m_lo)

    q_smem, do_smem, k_smem, v_smem, kv_bar, ready, empty = dkdv_ring(q_desc, do_desc, k_desc,
                                                                      v_desc, STAGES)
    consumer_args = (k_desc, v_desc, LSE, DELTA, PFL, DK, DV, q_smem, do_smem, k_smem, v_smem,
                     kv_bar, ready, empty, qk_scale, scale, Tq, Tc, q_offset, hq, group, row_k,
                     k0, col, b, hkv, z, n_b, m_lo, m_hi)
    gl.warp_specialize([
        (_consumer_keys_0_63, consumer_args),
        (_consumer_keys_64_127, consumer_args),
        (qdo_producer, (q_desc, do_desc, q_smem, do_smem, ready, empty, row_q, hkv, group, m_lo,
                     m_hi)),
    ], [CONSUMER_WARPS, 1], [CONSUMER_REGS, PRODUCER_REGS])


# launch

def dkdv_pooled_gluon(do, q, k_cmp, v_cmp, lse, delta, plan, block_m=None, stages=None):
    """(dk_cmp, dv_cmp) of cmp_bwd.py's contract (lse as the forward's, or folded with the gate;
    delta: the exact delta the dQ kernel wrote) through the Gluon kernel; ValueError outside
    its scope. block_m, stages: tuning overrides (the flash dK/dV kernel's defaults)."""
    why = scope_error(q, k_cmp)
    if why is not None:
        raise ValueError(why.replace("Gluon flash forward", "Gluon compressed dK/dV kernel"))
    B, tq, hq, d, tc, hkv = plan.shape
    bm, bn, st = DKDV_CFG[d]
    bm, st = block_m or bm, stages or st
    chunk = dkdv_chunk(tq, triton.cdiv(tc, bn) * B * hkv, bm)
    splits = triton.cdiv(tq, chunk)
    q, k_cmp, v_cmp, do = (t.contiguous() for t in (q, k_cmp, v_cmp, do))
    dk = alloc.empty((splits, *k_cmp.shape), torch.float32, q.device)
    dv = alloc.empty((splits, *v_cmp.shape), torch.float32, q.device)
    half = HALF_N.value
    _pooled_dkdv_kernel[(triton.cdiv(tc, bn), B * hkv, splits)](
        tile_desc(q, bm), tile_desc(k_cmp, half), tile_desc(v_cmp, half), tile_desc(do, bm),
        lse, delta, key_bounds(plan), dk, dv, plan.scale * LOG2E_F, plan.scale, tq, tc,
        plan.q_offset, hq, hq // hkv, B, chunk // bm, HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn,
        STAGES=st, CONSUMER_REGS=CONSUMER_REGS, PRODUCER_REGS=PRODUCER_REGS,
        num_warps=CONSUMER_WARPS)
    return dk.sum(0).to(k_cmp.dtype), dv.sum(0).to(v_cmp.dtype)  # fixed order: deterministic
