"""Public NSA op and the block compression helper.

    nsa_attn(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_swa, *, cmp_block, cmp_stride, sel_block,
             topk, window, scale, cu_seqlens, q_offset, gates_nonneg) -> o

Implementation (attn.dispatch.impl_for): Triton on CUDA tensors, ref.py (dense masks, autograd)
on CPU tensors; ATTN_IMPL=triton|ref forces one. The Triton path, never materialising T × T:
  cmp.py       compressed attention over the visible compressed keys (o_cmp and its lse)
  select.py    selection scores from the compressed probabilities (recomputed from that lse),
               summed over the GQA group, top-n per query and group on chip
  slc.py       attention over the selected blocks, each block loaded once for the group's heads
               (union.py: per-tile block lists; slc_dkdv.py: dK/dV)
  flash        the sliding window (attn.flash's kernels with window=); window = 0: no window
               branch (two-branch NSA, fla's parallel_nsa default; g_swa None)
  gate_mix.py  o = g_cmp·o_cmp + g_slc·o_slc (+ g_swa·o_swa) in fp32, in slc.py's epilogue
One pair of PyTorch custom ops (`longctx::nsa_fwd` / `longctx::nsa_bwd`, opaque to
torch.compile) runs the branches' forward and backward primitives, so the backward can share
work between them: the gated sum's backward pass also gives each branch its delta (three fewer
passes over [T, H, D] tensors), and the three dQ kernels add into one dQ in their epilogues (no
separate sums). With gates >= 0 (`gates_nonneg`: NSACore's sigmoid gates always are; nsa_attn
checks other gates once) the gates are folded into the branches' lse (lse − ln g; gate_mix.py),
so every branch backward reads dO itself and no gated dO_i = g_i·dO is ever written
(3 × [T, Hq, D]); signed gates take the unfolded path. The selection carries no gradient (as
in ref.py).

Compressed layout (see ref.py): without cu_seqlens k_cmp/v_cmp are [B, Tc(T), Hkv, D]; with
cu_seqlens (B == 1) they are each document's complete blocks concatenated in document order,
[1, Σ_d Tc(L_d), Hkv, D], or that padded with unused rows to [1, Tc(T), Hkv, D] (the form
`compress` produces: no host read); `cmp_cu_seqlens(cu_seqlens, cmp_block, cmp_stride)` gives
the boundaries on the compressed axis.
"""
from __future__ import annotations

from typing import Optional

import torch

from attn.common import alloc
from attn.common.checks import check_cu_seqlens, check_cu_values, check_qkv, check_triton_inputs
from attn.common.customop import autograd_op_or_body, op_or_body
from attn.common.documents import block_table, key_doc_bounds
from attn.dispatch import impl_for
from attn.nsa.ref import (check_window, cmp_block_starts, cmp_cu_seqlens, cmp_rows,
                          nsa_attn_ref, num_cmp_blocks)

_HEAD_DIMS = (16, 32, 64, 128)


def compress(k, v, cmp_block: int, cmp_stride: int, *, cu_seqlens=None, fn=None):
    """(k_cmp, v_cmp): each document's complete blocks of `cmp_block` keys every `cmp_stride`,
    reduced by `fn` (default: mean over the block's keys).

    k, v [B, T, Hkv, D]; fn(blocks, which) maps blocks [B, Tc, cmp_block, Hkv, D] to
    [B, Tc, Hkv, D], with which = "k" or "v" (so a layer can use one MLP for each).
    Blocks never cross a document boundary. With cu_seqlens the result is the padded layout of
    attn/nsa/ref.py (Tc(T) rows, the documents' blocks first): its shape comes from T alone, so
    no host read of cu_seqlens (torch.compile traces it in one graph)."""
    if k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"compress: k {tuple(k.shape)}, v {tuple(v.shape)}: expected k, v "
                         "[B, T, Hkv, D]")
    _check_blocks(cmp_block, cmp_stride, "compress: ")
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, k.shape[0], k.shape[1], "compress: ")
    starts, _ = cmp_block_starts(k.shape[1], cmp_block, cmp_stride, cu_seqlens, k.device,
                                 rows=num_cmp_blocks(k.shape[1], cmp_block, cmp_stride))
    idx = starts[:, None] + torch.arange(cmp_block, device=k.device)    # [Tc, cmp_block]
    out = []
    for t, which in ((k, "k"), (v, "v")):
        blocks = t[:, idx]                                               # [B, Tc, cb, Hkv, D]
        out.append(blocks.mean(2) if fn is None else fn(blocks, which))
    return out[0], out[1]


def _check_blocks(cmp_block, cmp_stride, where):
    if cmp_block < 1 or cmp_stride < 1 or cmp_stride > cmp_block:
        raise ValueError(f"{where}cmp_block={cmp_block}, cmp_stride={cmp_stride}: need "
                         "1 <= cmp_stride <= cmp_block (blocks cover every key)")


def _check(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_swa, cmp_block, cmp_stride, sel_block, topk,
           window, cu_seqlens, q_offset):
    check_qkv("nsa_attn", q, k, v, q_offset=q_offset, cu_seqlens=cu_seqlens)
    B, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    _check_blocks(cmp_block, cmp_stride, "nsa_attn: ")
    if sel_block < 1:
        raise ValueError(f"nsa_attn: sel_block={sel_block} must be >= 1")
    if topk < 3:
        raise ValueError(f"nsa_attn: topk={topk} must be >= 3 (block 0 and the two most recent "
                         "blocks are always selected)")
    check_window(window, g_swa, "nsa_attn")
    if cu_seqlens is not None:
        # with documents k_cmp is padded to the no-document count (compress's form) or exact;
        # the exact count is read from cu_seqlens, which torch.compile cannot trace: there only
        # the op body checks it (CmpPlan, same rule)
        padded = k_cmp.shape[1] == num_cmp_blocks(tk, cmp_block, cmp_stride)
        tc = None if torch.compiler.is_compiling() and not padded else \
            cmp_rows(tk, cmp_block, cmp_stride, cu_seqlens, k_cmp.shape[1])
        rule = ("Σ over documents of ⌊(L−cmp_block)/cmp_stride⌋+1 (complete blocks), or the "
                "padded ⌊(Tk−cmp_block)/cmp_stride⌋+1")
    else:
        tc = num_cmp_blocks(tk, cmp_block, cmp_stride)
        rule = "⌊(Tk−cmp_block)/cmp_stride⌋+1, 0 when Tk < cmp_block"
    for name, t in (("k_cmp", k_cmp), ("v_cmp", v_cmp)):
        if tuple(t.shape) != (B, t.shape[1] if tc is None else tc, hkv, d):
            raise ValueError(f"nsa_attn: {name} {tuple(t.shape)} must be [B, Tc, Hkv, D] = "
                             f"{(B, tc, hkv, d)}: Tc = {rule} with cmp_block={cmp_block}, "
                             f"cmp_stride={cmp_stride}")
    for name, t in (("g_cmp", g_cmp), ("g_slc", g_slc), ("g_swa", g_swa)):
        if t is not None and tuple(t.shape) != (B, tq, hq):
            raise ValueError(f"nsa_attn: {name} {tuple(t.shape)} must be [B, Tq, Hq] = "
                             f"{(B, tq, hq)} (one gate per query and head)")


def nsa_attn(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_swa, *, cmp_block: int = 32,
             cmp_stride: int = 16, sel_block: int = 64, topk: int = 16, window: int = 512,
             scale=None, cu_seqlens=None, q_offset: int = 0, gates_nonneg=None):
    """Native Sparse Attention, [B, T, H, D] layout (see ref.py for the definition);
    differentiable w.r.t. q, k, v, k_cmp, v_cmp and the gates. window=0 with g_swa=None: the
    compressed and selected branches only (no sliding-window branch).

    gates_nonneg (Triton path): True promises every gate is >= 0 (sigmoid gates, as NSACore's),
    so the backward folds the gates into the branches' lse; False takes the signed path; None
    checks the gates here (one host sync), or under torch.compile in the backward op."""
    _check(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_swa, cmp_block, cmp_stride, sel_block, topk,
           window, cu_seqlens, q_offset)
    if gates_nonneg not in (None, True, False):
        raise ValueError(f"nsa_attn: gates_nonneg={gates_nonneg!r} must be None, True or False")
    if impl_for(q) == "ref":
        return nsa_attn_ref(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_swa, cmp_block=cmp_block,
                            cmp_stride=cmp_stride, sel_block=sel_block, topk=topk, window=window,
                            scale=scale, cu_seqlens=cu_seqlens, q_offset=q_offset)
    from attn.nsa.select import check_geometry
    check_triton_inputs(q, _HEAD_DIMS, "nsa_attn: ")
    check_geometry(cmp_block, cmp_stride, sel_block, topk)
    if not (q.dtype == k.dtype == v.dtype == k_cmp.dtype == v_cmp.dtype):
        raise ValueError(f"nsa_attn: q, k, v, k_cmp, v_cmp must share one dtype, got {q.dtype}, "
                         f"{k.dtype}, {v.dtype}, {k_cmp.dtype}, {v_cmp.dtype}")
    q, k, v, k_cmp, v_cmp = (t.contiguous() for t in (q, k, v, k_cmp, v_cmp))
    scale = float(q.shape[3] ** -0.5 if scale is None else scale)
    gates = torch.stack([g_cmp, g_slc] + ([] if window == 0 else [g_swa]), dim=-1).to(q.dtype)
    if gates_nonneg is None and not torch.compiler.is_compiling():
        gates_nonneg = _nonneg(gates)
    return _nsa_fwd(q, k, v, k_cmp, v_cmp, gates, scale, cmp_block, cmp_stride, sel_block, topk,
                    window, cu_seqlens, q_offset, gates_nonneg)[0]


def _nonneg(gates) -> bool:
    return gates.numel() == 0 or bool(gates.amin() >= 0)


def _geometry(q, k, k_cmp, v_cmp, scale, cmp_block, cmp_stride, sel_block, cu_seqlens,
              q_offset):
    """The compressed branch's plan, the selection blocks' table and the window's document
    arrays: host arithmetic and cached tables without documents; with them O(T) torch ops and
    a few host syncs (block and compressed-row counts). Built in the forward and again in the
    backward op, since a custom op passes only tensors of shapes known from its inputs."""
    from attn.nsa.cmp_plan import CmpPlan
    tk = k.shape[1]
    plan = CmpPlan(q, k_cmp, v_cmp, scale, cmp_block, cmp_stride, cu_seqlens, q_offset, tk)
    return plan, block_table(cu_seqlens, tk, sel_block, q.device), key_doc_bounds(cu_seqlens, tk)


# The Triton layer as two PyTorch custom ops: torch.compile sees one opaque op per attention
# call (fake implementations give the shapes) and compiles the model around it; eager calls run
# the same bodies without the dispatcher (attn/common/customop.py). The forward also returns
# what the backward needs (the branches' o, lse and the selection; not differentiable), so that
# the backward can share work between the branches (module docstring).
_FWD_OUT = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                 torch.Tensor, torch.Tensor, torch.Tensor]


def _nsa_fwd_body(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cmp: torch.Tensor,
                  v_cmp: torch.Tensor, gates: torch.Tensor, scale: float, cmp_block: int,
                  cmp_stride: int, sel_block: int, topk: int, window: int,
                  cu_seqlens: Optional[torch.Tensor], q_offset: int,
                  gates_nonneg: Optional[bool]) -> _FWD_OUT:
    """(o, o_cmp, lse_cmp, o_slc, lse_slc, o_swa, lse_swa, sel); gates [B, T, Hq, 3], or
    [B, T, Hq, 2] with window = 0 (then o_swa, lse_swa are empty)."""
    from attn.flash.op import fwd_kernel as window_fwd
    from attn.nsa.cmp import fwd as cmp_fwd
    from attn.nsa.select import select_blocks
    from attn.nsa.slc import slc_attn_fwd
    check_cu_values(cu_seqlens, k.shape[1])
    if gates_nonneg and not gates.is_cuda and not _nonneg(gates):  # free to check off the GPU
        raise ValueError("gates_nonneg=True, but a gate is negative")
    # the kernels assume the contiguous layout; a compiled graph could hand other strides
    q, k, v, k_cmp, v_cmp, gates = (t.contiguous() for t in (q, k, v, k_cmp, v_cmp, gates))
    plan, table, seg = _geometry(q, k, k_cmp, v_cmp, scale, cmp_block, cmp_stride, sel_block,
                                 cu_seqlens, q_offset)
    o_cmp, lse_cmp = cmp_fwd(q, k_cmp, v_cmp, plan)
    cu_cmp = None if cu_seqlens is None else cmp_cu_seqlens(cu_seqlens, cmp_block, cmp_stride)
    sel = select_blocks(q, k_cmp, lse_cmp, table, scale=scale, cmp_block=cmp_block,
                        cmp_stride=cmp_stride, sel_block=sel_block, topk=topk,
                        cu_seqlens=cu_seqlens, cu_cmp=cu_cmp, q_offset=q_offset)
    if window:
        o_swa, lse_swa = window_fwd(q, k, v, scale, None if seg is None else seg[0], q_offset,
                                    window)
        o_win = o_swa
    else:  # no window branch: its outputs are two empty tensors (outputs must not alias)
        o_swa, lse_swa = q.new_empty((0,)), q.new_empty((0,), dtype=torch.float32)
        o_win = None
    # the selected branch runs last: its epilogue writes the gated sum as well (gate_mix.py)
    o_slc, lse_slc, o = slc_attn_fwd(q, k, v, sel, table[2], table[3], scale=scale,
                                     sel_block=sel_block, q_offset=q_offset,
                                     mix=(o_cmp, o_win, gates))
    return o, o_cmp, lse_cmp, o_slc, lse_slc, o_swa, lse_swa, sel


_nsa_fwd_op = torch.library.custom_op("longctx::nsa_fwd", mutates_args=())(_nsa_fwd_body)


@_nsa_fwd_op.register_fake
def _(q, k, v, k_cmp, v_cmp, gates, scale, cmp_block, cmp_stride, sel_block, topk, window,
      cu_seqlens, q_offset, gates_nonneg):
    B, tq, hq, _ = q.shape
    o = [torch.empty_like(q, memory_format=torch.contiguous_format) for _ in range(4)]
    lse = [q.new_empty((B, hq, tq), dtype=torch.float32) for _ in range(3)]
    sel = q.new_empty((B, tq, k.shape[2], topk), dtype=torch.int32)
    if not window:  # no window branch: its outputs are empty
        o[3], lse[2] = q.new_empty((0,)), q.new_empty((0,), dtype=torch.float32)
    return o[0], o[1], lse[0], o[2], lse[1], o[3], lse[2], sel


def _nsa_bwd_body(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  k_cmp: torch.Tensor, v_cmp: torch.Tensor, gates: torch.Tensor,
                  o_cmp: torch.Tensor, lse_cmp: torch.Tensor, o_slc: torch.Tensor,
                  lse_slc: torch.Tensor, o_swa: torch.Tensor, lse_swa: torch.Tensor,
                  sel: torch.Tensor, scale: float, cmp_block: int, cmp_stride: int,
                  sel_block: int, window: int, cu_seqlens: Optional[torch.Tensor],
                  q_offset: int, gates_nonneg: Optional[bool]
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                             torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dk_cmp, dv_cmp, dgates)."""
    from attn.flash.bwd import bwd_triton
    from attn.nsa.cmp_bwd import bwd_triton as cmp_bwd
    from attn.nsa.gate_mix import gate_mix_bwd, gate_mix_bwd_folded
    from attn.nsa.slc import slc_attn_bwd
    q, k, v, k_cmp, v_cmp, gates, o_cmp, lse_cmp, o_slc, lse_slc, o_swa, lse_swa, sel, do = (
        t.contiguous() for t in (q, k, v, k_cmp, v_cmp, gates, o_cmp, lse_cmp, o_slc, lse_slc,
                                 o_swa, lse_swa, sel, do))
    plan, table, seg = _geometry(q, k, k_cmp, v_cmp, scale, cmp_block, cmp_stride, sel_block,
                                 cu_seqlens, q_offset)
    B, tq, hq, _ = q.shape
    o_win = o_swa if window else None               # the window branch's output, if any
    branch_lse = (lse_cmp, lse_slc) + ((lse_swa,) if window else ())
    if _nonneg(gates) if gates_nonneg is None else gates_nonneg:
        # every branch backward takes dO itself, its lse shifted by −ln g (gate_mix.py)
        dgates, lses, deltas = gate_mix_bwd_folded(do, o_cmp, o_slc, o_win, gates, branch_lse)
        do_cmp = do_slc = do_swa = do
        g_cmp = gates
    else:
        deltas = alloc.empty((len(branch_lse), B, hq, tq), torch.float32, q.device)
        do_cmp, do_slc, do_swa, dgates = gate_mix_bwd(do, o_cmp, o_slc, o_win, gates,
                                                      deltas=deltas)
        lses, g_cmp = branch_lse, None
    dq, dk_cmp, dv_cmp = cmp_bwd(do_cmp, q, k_cmp, v_cmp, o_cmp, lses[0], plan, deltas[0],
                                 gates=g_cmp)
    del do_cmp
    _, dk, dv = slc_attn_bwd(do_slc, q, k, v, o_slc, lses[1], sel, table[2], table[3],
                             scale=scale, sel_block=sel_block, q_offset=q_offset,
                             delta=deltas[1], dq=dq)
    del do_slc
    if window:
        _, dk_swa, dv_swa = bwd_triton(do_swa, q, k, v, o_swa, lses[2], scale, seg, q_offset,
                                       window, deltas[2], dq)
        dk += dk_swa
        dv += dv_swa
    return dq, dk, dv, dk_cmp, dv_cmp, dgates


_nsa_bwd_op = torch.library.custom_op("longctx::nsa_bwd", mutates_args=())(_nsa_bwd_body)
_nsa_bwd = op_or_body(_nsa_bwd_op, _nsa_bwd_body)


@_nsa_bwd_op.register_fake
def _(do, q, k, v, k_cmp, v_cmp, gates, o_cmp, lse_cmp, o_slc, lse_slc, o_swa, lse_swa, sel,
      scale, cmp_block, cmp_stride, sel_block, window, cu_seqlens, q_offset, gates_nonneg):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format)
                 for t in (q, k, v, k_cmp, v_cmp, gates))


def _nsa_setup(ctx, inputs, output):
    (q, k, v, k_cmp, v_cmp, gates, scale, cmp_block, cmp_stride, sel_block, _, window,
     cu_seqlens, q_offset, gates_nonneg) = inputs
    saved = output[1:]
    ctx.save_for_backward(q, k, v, k_cmp, v_cmp, gates, *saved, cu_seqlens)
    ctx.args = (scale, cmp_block, cmp_stride, sel_block, window, q_offset, gates_nonneg)
    ctx.mark_non_differentiable(*saved)
    ctx.set_materialize_grads(False)  # no zero gradients built for the saved branch outputs


def _nsa_backward(ctx, do, *_):
    *tensors, cu_seqlens = ctx.saved_tensors
    scale, cmp_block, cmp_stride, sel_block, window, q_offset, gates_nonneg = ctx.args
    grads = _nsa_bwd(do, *tensors, scale, cmp_block, cmp_stride, sel_block, window, cu_seqlens,
                     q_offset, gates_nonneg)
    return (*grads,) + (None,) * 9


_nsa_fwd_op.register_autograd(_nsa_backward, setup_context=_nsa_setup)
_nsa_fwd = autograd_op_or_body(_nsa_fwd_op, _nsa_fwd_body, _nsa_setup, _nsa_backward)
