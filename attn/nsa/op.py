"""Public NSA op and the block compression helper.

    nsa_attn(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_swa, *, cmp_block, cmp_stride, sel_block,
             topk, window, scale, cu_seqlens, q_offset) -> o

Implementation (attn.dispatch.impl_for): Triton on CUDA tensors, ref.py (dense masks, autograd)
on CPU tensors; ATTN_IMPL=triton|ref forces one. The Triton path, never materialising T × T:
  cmp.py       compressed attention over the visible compressed keys (o_cmp and its lse)
  select.py    selection scores from the compressed probabilities (recomputed from that lse),
               summed over the GQA group, top-n per query and group on chip
  slc.py       attention over the selected blocks, each block loaded once for the group's heads
               (union.py: per-tile block lists; slc_dkdv.py: dK/dV)
  flash        the sliding window (attn.flash's kernels with window=)
  gate_mix.py  o = g_cmp·o_cmp + g_slc·o_slc + g_swa·o_swa, fused, fp32
One autograd Function (`_NSAFunction`) runs the branches' forward and backward primitives, so
the backward can share work between them: the gated sum's backward pass also gives each branch
its delta (three fewer passes over [T, H, D] tensors), and the three dQ kernels add into one dQ
in their epilogues (no separate sums). With gates >= 0 (checked without a host sync, see
_NonNegative) the gates are folded into the branches' lse (lse − ln g; gate_mix.py), so every
branch backward reads dO itself and no gated dO_i = g_i·dO is ever written (3 × [T, Hq, D]);
signed gates take the unfolded path. The selection carries no gradient (as in ref.py).

Compressed layout (see ref.py): without cu_seqlens k_cmp/v_cmp are [B, Tc(T), Hkv, D]; with
cu_seqlens (B == 1) they are each document's complete blocks concatenated in document order,
[1, Σ_d Tc(L_d), Hkv, D], and `cmp_cu_seqlens(cu_seqlens, cmp_block, cmp_stride)` gives the
boundaries on the compressed axis. `compress` produces exactly that layout.
"""
from __future__ import annotations

import torch

from attn.dispatch import check_triton_inputs, impl_for
from attn.masks import check_cu_seqlens
from attn.nsa.ref import cmp_block_starts, cmp_cu_seqlens, nsa_attn_ref, num_cmp_blocks

_HEAD_DIMS = (16, 32, 64, 128)


def compress(k, v, cmp_block: int, cmp_stride: int, *, cu_seqlens=None, fn=None):
    """(k_cmp, v_cmp): each document's complete blocks of `cmp_block` keys every `cmp_stride`,
    reduced by `fn` (default: mean over the block's keys).

    k, v [B, T, Hkv, D]; fn(blocks, which) maps blocks [B, Tc, cmp_block, Hkv, D] to
    [B, Tc, Hkv, D], with which = "k" or "v" (so a layer can use one MLP for each).
    Blocks never cross a document boundary; the result is in the layout above."""
    if k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)}, v {tuple(v.shape)}: expected k, v [B, T, Hkv, D]")
    _check_blocks(cmp_block, cmp_stride)
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, k.shape[0], k.shape[1])
    starts, _ = cmp_block_starts(k.shape[1], cmp_block, cmp_stride, cu_seqlens, k.device)
    idx = starts[:, None] + torch.arange(cmp_block, device=k.device)    # [Tc, cmp_block]
    out = []
    for t, which in ((k, "k"), (v, "v")):
        blocks = t[:, idx]                                               # [B, Tc, cb, Hkv, D]
        out.append(blocks.mean(2) if fn is None else fn(blocks, which))
    return out[0], out[1]


def _check_blocks(cmp_block, cmp_stride):
    if cmp_block < 1 or cmp_stride < 1 or cmp_stride > cmp_block:
        raise ValueError(f"cmp_block={cmp_block}, cmp_stride={cmp_stride}: need "
                         "1 <= cmp_stride <= cmp_block (blocks cover every key)")


def _check(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_swa, cmp_block, cmp_stride, sel_block, topk,
           window, cu_seqlens, q_offset):
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] \
            or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: expected "
                         "q [B, Tq, Hq, D] and k, v [B, Tk, Hkv, D]")
    B, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    if hq % hkv:
        raise ValueError(f"Hq={hq} must be a multiple of Hkv={hkv} (GQA groups)")
    _check_blocks(cmp_block, cmp_stride)
    if sel_block < 1:
        raise ValueError(f"sel_block={sel_block} must be >= 1")
    if topk < 3:
        raise ValueError(f"topk={topk} must be >= 3 (block 0 and the two most recent blocks "
                         "are always selected)")
    if window < 1:
        raise ValueError(f"window={window} must be >= 1")
    if q_offset < 0 or q_offset + tq > tk:
        raise ValueError(f"q_offset={q_offset} with Tq={tq} needs 0 <= q_offset and "
                         f"q_offset+Tq <= Tk={tk}")
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, B, tk)
        tc = int(cmp_cu_seqlens(cu_seqlens, cmp_block, cmp_stride)[-1])
        rule = "Σ over documents of ⌊(L−cmp_block)/cmp_stride⌋+1 (complete blocks)"
    else:
        tc = num_cmp_blocks(tk, cmp_block, cmp_stride)
        rule = "⌊(Tk−cmp_block)/cmp_stride⌋+1, 0 when Tk < cmp_block"
    for name, t in (("k_cmp", k_cmp), ("v_cmp", v_cmp)):
        if tuple(t.shape) != (B, tc, hkv, d):
            raise ValueError(f"{name} {tuple(t.shape)} must be [B, Tc, Hkv, D] = "
                             f"{(B, tc, hkv, d)}: Tc = {rule} with cmp_block={cmp_block}, "
                             f"cmp_stride={cmp_stride}")
    for name, t in (("g_cmp", g_cmp), ("g_slc", g_slc), ("g_swa", g_swa)):
        if tuple(t.shape) != (B, tq, hq):
            raise ValueError(f"{name} {tuple(t.shape)} must be [B, Tq, Hq] = {(B, tq, hq)} "
                             "(one gate per query and head)")


def nsa_attn(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_swa, *, cmp_block: int = 32,
             cmp_stride: int = 16, sel_block: int = 64, topk: int = 16, window: int = 512,
             scale=None, cu_seqlens=None, q_offset: int = 0):
    """Native Sparse Attention, [B, T, H, D] layout (see ref.py for the definition);
    differentiable w.r.t. q, k, v, k_cmp, v_cmp and the gates."""
    _check(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_swa, cmp_block, cmp_stride, sel_block, topk,
           window, cu_seqlens, q_offset)
    if impl_for(q) == "ref":
        return nsa_attn_ref(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_swa, cmp_block=cmp_block,
                            cmp_stride=cmp_stride, sel_block=sel_block, topk=topk, window=window,
                            scale=scale, cu_seqlens=cu_seqlens, q_offset=q_offset)
    from attn.nsa.select import check_geometry
    check_triton_inputs(q, _HEAD_DIMS, "nsa_attn: ")
    check_geometry(cmp_block, cmp_stride, sel_block, topk)
    if not (q.dtype == k.dtype == v.dtype == k_cmp.dtype == v_cmp.dtype):
        raise ValueError(f"q, k, v, k_cmp, v_cmp must share one dtype, got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}, {k_cmp.dtype}, {v_cmp.dtype}")
    q, k, v, k_cmp, v_cmp = (t.contiguous() for t in (q, k, v, k_cmp, v_cmp))
    scale = float(q.shape[3] ** -0.5 if scale is None else scale)
    gates = torch.stack([g_cmp, g_slc, g_swa], dim=-1).to(q.dtype)
    geometry = (cmp_block, cmp_stride, sel_block, topk, window)
    return _NSAFunction.apply(q, k, v, k_cmp, v_cmp, gates, scale, geometry, cu_seqlens, q_offset)


class _NonNegative:
    """Whether every gate is >= 0 (sigmoid gates always are), read in the backward without a
    host sync in the forward: on CUDA the flag is copied to pinned host memory ahead of the
    forward's kernels and waited for only when the backward asks (by then long done, so the
    wait leaves no gap on the GPU)."""

    def __init__(self, gates):
        self.event = None
        if gates.numel() == 0:
            self.flag = True
        elif gates.is_cuda:
            self.flag = torch.empty((), dtype=torch.bool, pin_memory=True)
            self.flag.copy_(gates.amin() >= 0, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.flag = bool(gates.amin() >= 0)

    def get(self) -> bool:
        if self.event is not None:
            self.event.synchronize()
            self.flag, self.event = bool(self.flag), None
        return self.flag


class _NSAFunction(torch.autograd.Function):
    """The Triton layer: gradients for q, k, v, k_cmp, v_cmp and the packed gates [B, T, Hq, 3]
    (cmp, slc, swa)."""

    # Arguments were checked by nsa_attn: the forward builds the compressed branch's plan and
    # the window's document arrays once (with documents that costs host syncs) and the backward
    # reuses them, calling the launchers under the checked primitives.

    @staticmethod
    def forward(ctx, q, k, v, k_cmp, v_cmp, gates, scale, geometry, cu_seqlens, q_offset):
        from attn.flash.fwd import fwd_triton
        from attn.flash.op import _seg
        from attn.moba.gate import block_table
        from attn.nsa.cmp import _fwd, _Plan
        from attn.nsa.gate_mix import gate_mix_fwd
        from attn.nsa.select import select_blocks
        from attn.nsa.slc import slc_attn_fwd
        cmp_block, cmp_stride, sel_block, topk, window = geometry
        # first, so that its flag has long reached the host when the backward asks
        gates_nonneg = _NonNegative(gates)
        tk = k.shape[1]
        plan = _Plan(q, k_cmp, v_cmp, scale, cmp_block, cmp_stride, cu_seqlens, q_offset, tk)
        o_cmp, lse_cmp = _fwd(q, k_cmp, v_cmp, plan)
        table = block_table(cu_seqlens, tk, sel_block, q.device)
        cu_cmp = None if cu_seqlens is None else cmp_cu_seqlens(cu_seqlens, cmp_block, cmp_stride)
        sel = select_blocks(q, k_cmp, lse_cmp, table, scale=scale, cmp_block=cmp_block,
                            cmp_stride=cmp_stride, sel_block=sel_block, topk=topk,
                            cu_seqlens=cu_seqlens, cu_cmp=cu_cmp, q_offset=q_offset)
        blk_start, blk_end = table[2], table[3]
        o_slc, lse_slc = slc_attn_fwd(q, k, v, sel, blk_start, blk_end, scale=scale,
                                      sel_block=sel_block, q_offset=q_offset)
        seg = _seg(cu_seqlens, tk)
        o_swa, lse_swa = fwd_triton(q, k, v, scale, None if seg is None else seg[0], q_offset,
                                    window)
        ctx.save_for_backward(q, k, v, k_cmp, v_cmp, gates, o_cmp, lse_cmp, o_slc, lse_slc,
                              o_swa, lse_swa, sel, blk_start, blk_end)
        ctx.args = (scale, geometry, q_offset, plan, seg)
        ctx.gates_nonneg = gates_nonneg
        return gate_mix_fwd(o_cmp, o_slc, o_swa, gates)

    @staticmethod
    def backward(ctx, do):
        from attn.flash import common
        from attn.flash.bwd import bwd_triton
        from attn.nsa.cmp_bwd import _bwd as cmp_bwd
        from attn.nsa.gate_mix import gate_mix_bwd, gate_mix_bwd_folded
        from attn.nsa.slc import slc_attn_bwd
        (q, k, v, k_cmp, v_cmp, gates, o_cmp, lse_cmp, o_slc, lse_slc, o_swa, lse_swa, sel,
         blk_start, blk_end) = ctx.saved_tensors
        scale, (_, _, sel_block, _, window), q_offset, plan, seg = ctx.args
        B, tq, hq, _ = q.shape
        do = do.contiguous()
        if ctx.gates_nonneg.get():
            # every branch backward takes dO itself, its lse shifted by −ln g (gate_mix.py)
            dgates, lses, deltas = gate_mix_bwd_folded(do, o_cmp, o_slc, o_swa, gates,
                                                       (lse_cmp, lse_slc, lse_swa))
            do_cmp = do_slc = do_swa = do
            g_cmp = gates
        else:
            deltas = common.empty((3, B, hq, tq), torch.float32, q.device)  # gate_mix_bwd's
            do_cmp, do_slc, do_swa, dgates = gate_mix_bwd(do, o_cmp, o_slc, o_swa, gates,
                                                          deltas=deltas)
            lses, g_cmp = (lse_cmp, lse_slc, lse_swa), None
        dq, dk_cmp, dv_cmp = cmp_bwd(do_cmp, q, k_cmp, v_cmp, o_cmp, lses[0], plan, deltas[0],
                                     gates=g_cmp)
        del do_cmp
        _, dk, dv = slc_attn_bwd(do_slc, q, k, v, o_slc, lses[1], sel, blk_start, blk_end,
                                 scale=scale, sel_block=sel_block, q_offset=q_offset,
                                 delta=deltas[1], dq=dq)
        del do_slc
        _, dk_swa, dv_swa = bwd_triton(do_swa, q, k, v, o_swa, lses[2], scale, seg, q_offset,
                                       window, deltas[2], dq)
        dk += dk_swa
        dv += dv_swa
        return dq, dk, dv, dk_cmp, dv_cmp, dgates, None, None, None, None
