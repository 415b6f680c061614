"""Forward kernel in Gluon for Hopper (sm_90): causal softmax attention with the softmax of key
block j overlapping the P·V product of block j − 1 (FlashAttention-3's intra-warpgroup
pipelining), K/V streamed by TMA into a ring of shared-memory stages.

Memory plan (one program = BLOCK_M query rows of one (batch, query head), 8 warps: two
warpgroups of 64 rows each):
  shared    : Q tile [BLOCK_M, D] (TMA, also the staging tile of O's TMA store), STAGES stages of
              K and V tiles [BLOCK_N, D], one mbarrier per tile (TMA completion)
  registers : O accumulator [BLOCK_M, D] fp32, the score tile of block j [BLOCK_M, BLOCK_N] fp32,
              P of block j − 1 (input dtype, the wgmma's register A operand, read by the product
              in flight), row max and sum fp32
  HBM writes: O once (TMA store), lse once [BLOCK_M] fp32
Step j: wait K_j; issue S_j = Q·K_jᵀ; issue O += P_{j−1}·V_{j−1}; wait for S_j only (wgmma groups
retire in order, so O's product stays in flight); softmax of S_j; wait for O's product; free the
stage of block j − 1 (a CTA barrier: both warpgroups have read it) and load block j − 1 + STAGES
into it; rescale O by exp2(m_old − m_new). Scores in the log2 domain; the row max is taken on the
raw scores and scaled once per row. Masking: key blocks below the tile's first row need none
(the first loop); the BLOCK_M / BLOCK_N blocks on the diagonal mask kpos > qpos (the second).
Scope: Tq = Tk, no documents, no window, q_offset 0, T a multiple of BLOCK_M, D 64 or 128,
16-bit inputs, GQA; checked in fwd_gluon(). fwd_gluon_ws.py runs the same rows (_attend_rows,
_step) in a warp-specialized program.
"""
from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                              warpgroup_mma, warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from attn.common import alloc
from attn.common.jit import LOG2E_F

# names that moved between triton 3.6 (the GPU image) and 3.9: a CTA-wide barrier, the TMA copies
cta_sync = gl.thread_barrier if hasattr(gl, "thread_barrier") else gl.barrier
tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared
tma_store = tma.async_store if hasattr(tma, "async_store") else tma.async_copy_shared_to_global
LN2 = gl.constexpr(0.6931471805599453)  # ln(2): lse leaves the log2 domain


@gluon.jit
def _load_kv(k_desc, v_desc, k_smem, v_smem, k_bar, v_bar, blk, row0, col, n,
             BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """TMA loads of key block blk (if blk < n) into stage blk % STAGES."""
    if blk < n:
        st = blk % STAGES
        mbarrier.expect(k_bar.index(st), k_desc.block_type.nbytes)
        tma_load(k_desc, [row0 + blk * BLOCK_N, col], k_bar.index(st), k_smem.index(st))
        mbarrier.expect(v_bar.index(st), v_desc.block_type.nbytes)
        tma_load(v_desc, [row0 + blk * BLOCK_N, col], v_bar.index(st), v_smem.index(st))


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
def _softmax(s, m_i, l_i, qk_scale, j, q0, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
             s_layout: gl.constexpr, MASKED: gl.constexpr):
    """Online-softmax update on raw scores s of key block j: (p fp32, alpha, m_new, l_new)."""
    if MASKED:
        kpos = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        qpos = q0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
        s = gl.where(kpos[None, :] <= qpos[:, None], s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
    p = gl.exp2(s * qk_scale - m_new[:, None])
    alpha = gl.exp2(m_i - m_new)
    l_new = l_i * alpha + gl.sum(p, axis=1)
    return p, alpha, m_new, l_new


@gluon.jit
def _step(j, acc, p16, m_i, l_i, q_smem, k_smem, v_smem, k_bar, v_bar, empty, k_desc, v_desc,
          row0, col, n, q0, qk_scale, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
          STAGES: gl.constexpr, s_layout: gl.constexpr, o_layout: gl.constexpr,
          p_layout: gl.constexpr, MASKED: gl.constexpr, WS: gl.constexpr):
    """Step j of the loop for the BLOCK_M rows at q0 (module docstring). The stage of block j − 1
    is then free: WS (fwd_gluon_ws.py) arrives on its `empty` barrier for the producer warp;
    otherwise this program loads block j − 1 + STAGES into it (k_desc, v_desc, row0, col; `empty`
    unused)."""
    st = j % STAGES
    pst = (j - 1) % STAGES
    mbarrier.wait(k_bar.index(st), (j // STAGES) & 1)
    s = warpgroup_mma(q_smem, k_smem.index(st).permute((1, 0)),
                      gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout), use_acc=False,
                      is_async=True)
    mbarrier.wait(v_bar.index(pst), ((j - 1) // STAGES) & 1)
    acc = warpgroup_mma(p16, v_smem.index(pst), acc, is_async=True)
    s = warpgroup_mma_wait(num_outstanding=1, deps=(s,))       # S_j done, P·V still running
    p, alpha, m_i, l_i = _softmax(s, m_i, l_i, qk_scale, j, q0, BLOCK_M, BLOCK_N, s_layout,
                                  MASKED)
    # K_{j+1}'s barrier (needed next step anyway) closes a basic block here: ptxas schedules
    # within blocks, so the softmax cannot be moved below the wait for P·V that follows
    mbarrier.wait(k_bar.index((j + 1) % STAGES), ((j + 1) // STAGES) & 1, pred=j + 1 < n)
    acc, p16 = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p16))
    cta_sync()  # every warp of the program (WS: of the partition) is done with stage pst
    if WS:
        mbarrier.arrive(empty.index(pst), count=1)  # one elected arrive for the partition
    else:
        _load_kv(k_desc, v_desc, k_smem, v_smem, k_bar, v_bar, j - 1 + STAGES, row0, col, n,
                 BLOCK_N, STAGES)
    acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
    # P_{j−1}'s registers are read by the product in flight until the wait above: handing them
    # over only here keeps ptxas from giving them to the softmax (it would, and then wait for
    # P·V before the softmax, which undoes the overlap)
    p16 = _handover(gl.convert_layout(p.to(q_smem.dtype), p_layout), p16,
                    q_smem.dtype == gl.bfloat16)
    return acc, p16, m_i, l_i


@gluon.jit
def _attend_rows(q_smem, o_desc, LSE, k_smem, v_smem, k_bar, v_bar, empty, k_desc, v_desc, row0,
                 col, h, q0, n, pid_bh, T, qk_scale, BLOCK_M: gl.constexpr,
                 BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
                 NUM_WARPS: gl.constexpr, WS: gl.constexpr):
    """The BLOCK_M rows at q0 once their Q tile is in q_smem: block 0, the steps over blocks
    1 .. n − 1, the last P·V, then O (through q_smem, by TMA) and lse stored. NUM_WARPS warps
    (4 per warpgroup of 64 rows); WS: see _step."""
    # wgmma layouts: warps along M (16 rows each), one instruction spans N
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)

    # block 0 (masked when it is on the diagonal): S_0 and its softmax, no P·V yet
    mbarrier.wait(k_bar.index(0), 0)
    s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)),
                      gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout), use_acc=False,
                      is_async=True)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
    m_i = gl.full([BLOCK_M], -1.0e30, gl.float32, gl.SliceLayout(1, s_layout))  # finite: no NaN
    l_i = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, s_layout))
    p, alpha, m_i, l_i = _softmax(s, m_i, l_i, qk_scale, 0, q0, BLOCK_M, BLOCK_N, s_layout,
                                  True)
    p16 = gl.convert_layout(p.to(q_smem.dtype), p_layout)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)

    n_full = q0 // BLOCK_N           # blocks every row of the tile sees whole
    for j in range(1, n_full):
        acc, p16, m_i, l_i = _step(j, acc, p16, m_i, l_i, q_smem, k_smem, v_smem, k_bar, v_bar,
                                   empty, k_desc, v_desc, row0, col, n, q0, qk_scale, BLOCK_M,
                                   BLOCK_N, STAGES, s_layout, o_layout, p_layout, False, WS)
    for j in range(gl.maximum(n_full, 1), n):
        acc, p16, m_i, l_i = _step(j, acc, p16, m_i, l_i, q_smem, k_smem, v_smem, k_bar, v_bar,
                                   empty, k_desc, v_desc, row0, col, n, q0, qk_scale, BLOCK_M,
                                   BLOCK_N, STAGES, s_layout, o_layout, p_layout, True, WS)

    # the last block's P·V
    last = n - 1
    mbarrier.wait(v_bar.index(last % STAGES), (last // STAGES) & 1)
    acc = warpgroup_mma(p16, v_smem.index(last % STAGES), acc, is_async=True)
    acc, p16 = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p16))

    l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))
    acc = acc / l_o[:, None]
    q_smem.store(acc.to(q_smem.dtype))   # Q is no longer read: its tile stages O
    fence_async_shared()
    tma_store(o_desc, [row0 + q0, h * HEAD_DIM], q_smem)
    rows = q0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
    gl.store(LSE + pid_bh.to(gl.int64) * T + rows, (m_i + gl.log2(l_i)) * LN2)
    tma.store_wait(pendings=0)


@gluon.jit
def _fwd_gluon_kernel(q_desc, k_desc, v_desc, o_desc, LSE, qk_scale, T,
                      HQ: gl.constexpr, HKV: gl.constexpr, HEAD_DIM: gl.constexpr,
                      BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                      num_warps: gl.constexpr):
    # heaviest (latest) query blocks first
    q0 = (gl.num_programs(0) - 1 - gl.program_id(0)) * BLOCK_M
    pid_bh = gl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    hkv = h // (HQ // HKV)
    row0 = b * T                     # first row of this batch in the [B·T, H·D] views
    col = hkv * HEAD_DIM

    q_smem = gl.allocate_shared_memory(q_desc.dtype, q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_bar.index(i), count=1)
        mbarrier.init(v_bar.index(i), count=1)
    fence_async_shared()

    n = (q0 + BLOCK_M) // BLOCK_N    # causal: key blocks 0 .. n−1
    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma_load(q_desc, [row0 + q0, h * HEAD_DIM], q_bar, q_smem)
    for i in gl.static_range(STAGES):
        _load_kv(k_desc, v_desc, k_smem, v_smem, k_bar, v_bar, i, row0, col, n, BLOCK_N, STAGES)
    mbarrier.wait(q_bar, 0)
    # 8 warps: two warpgroups of 64 rows; `empty` unused without WS
    _attend_rows(q_smem, o_desc, LSE, k_smem, v_smem, k_bar, v_bar, k_bar, k_desc, v_desc, row0,
                 col, h, q0, n, pid_bh, T, qk_scale, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES,
                 num_warps, False)
    mbarrier.invalidate(q_bar)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(k_bar.index(i))
        mbarrier.invalidate(v_bar.index(i))


# (BLOCK_M, BLOCK_N, STAGES) per head dim. Shared memory: Q BLOCK_M x D + STAGES x (K + V)
# BLOCK_N x D each, 16-bit: 128 KB at D = 128 (BLOCK_N = 64: a 128-key tile would need 224 KB
# for 3 stages), 112 KB at D = 64. 8 warps; ptxas (triton 3.6, sm_90a): 160 / 204 registers, no
# spills. STAGES >= 3: step j waits for K_{j+1}, which step j − 1 loaded.
GLUON_CFG = {64: (128, 128, 3), 128: (128, 64, 3)}


def prepare(q, k, v, scale, cfg, q_rows_per_tile=1, block_n=None, stages=None):
    """Checks (the scope of the module docstring; ValueError outside it) and launch arguments
    shared by both Gluon kernels: (o, lse, args, meta, grid). cfg: the kernel's table of
    (BLOCK_M, BLOCK_N, STAGES) per head dim; the Q / O descriptors cover BLOCK_M //
    q_rows_per_tile rows (fwd_gluon_ws.py: one tile per consumer warpgroup)."""
    B, T, hq, d = q.shape
    hkv = k.shape[2]
    if not q.is_cuda or torch.cuda.get_device_capability(q.device)[0] != 9:
        raise ValueError("the Gluon flash forward needs a Hopper GPU (sm_90)")
    if q.dtype not in (torch.bfloat16, torch.float16) or d not in cfg:
        raise ValueError(f"the Gluon flash forward takes bf16/fp16 and D in {sorted(cfg)}; "
                         f"got {q.dtype}, D={d}")
    bm, bn, st = cfg[d]
    bn, st = block_n or bn, stages or st
    if st < 3 or bm % bn:
        # each step waits for K_{j+1}, which the step before loaded only when STAGES >= 3
        raise ValueError(f"the Gluon flash forward needs STAGES >= 3 and BLOCK_N dividing "
                         f"BLOCK_M; got STAGES={st}, BLOCK_N={bn}")
    if k.shape[1] != T or T % bm or hq % hkv:
        raise ValueError(f"the Gluon flash forward needs Tq = Tk, a multiple of {bm}, and Hq a "
                         f"multiple of Hkv; got Tq={T}, Tk={k.shape[1]}, Hq={hq}, Hkv={hkv}")
    q, k, v = (t.contiguous() for t in (q, k, v))
    o = alloc.empty(q.shape, q.dtype, q.device)
    lse = alloc.empty((B, hq, T), torch.float32, q.device)
    gdt = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    q_rows = bm // q_rows_per_tile
    q_lay = gl.NVMMASharedLayout.get_default_for([q_rows, d], gdt)
    kv_lay = gl.NVMMASharedLayout.get_default_for([bn, d], gdt)
    q2, o2 = q.view(B * T, hq * d), o.view(B * T, hq * d)
    k2, v2 = k.view(B * T, hkv * d), v.view(B * T, hkv * d)
    q_desc = TensorDescriptor(q2, list(q2.shape), list(q2.stride()), [q_rows, d], q_lay)
    o_desc = TensorDescriptor(o2, list(o2.shape), list(o2.stride()), [q_rows, d], q_lay)
    k_desc = TensorDescriptor(k2, list(k2.shape), list(k2.stride()), [bn, d], kv_lay)
    v_desc = TensorDescriptor(v2, list(v2.shape), list(v2.stride()), [bn, d], kv_lay)
    args = (q_desc, k_desc, v_desc, o_desc, lse, scale * LOG2E_F, T)
    meta = dict(HQ=hq, HKV=hkv, HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, STAGES=st)
    return o, lse, args, meta, (T // bm, B * hq)


def fwd_gluon(q, k, v, scale, block_n=None, stages=None):
    """(o, lse) of causal attention through the Gluon kernel."""
    o, lse, args, meta, grid = prepare(q, k, v, scale, GLUON_CFG, 1, block_n, stages)
    _fwd_gluon_kernel[grid](*args, **meta, num_warps=8)
    return o, lse
