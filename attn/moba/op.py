"""Public MoBA op: argument checks, implementation dispatch and the custom ops (autograd).

    moba_attn(q, k, v, *, block_size, topk, scale, cu_seqlens, q_offset) -> o

Layout [B, T, H, D] contiguous; causal with absolute positions (query i at q_offset + i against
keys 0..Tk-1: a CP shard's queries against gathered keys); cu_seqlens (int32 [N+1], B == 1)
describes the key sequence, blocks restart at every document. Definition: ref.py.
Implementation (attn.dispatch.impl_for): Triton on CUDA tensors, ref.py (dense masks, autograd)
on CPU tensors; ATTN_IMPL=triton|ref forces one (TRITON_INTERPRET=1 with ATTN_IMPL=triton runs
the kernels on CPU tensors). The Triton path, never materialising T × T:
  gate.py    mean-pooled keys per block (blocks: attn/common/documents.py block_table),
             streaming top-(k−1) selection per head
  index.py   inverse index block -> routed queries (counting sort over tiles, two kernels)
  routed.py  per block, its gathered routed rows attend it in full
             (partial output + lse, partial dQ per (row, slot))
  fwd.py     per query tile: own block (causal) merged with the row's routed partials (forward
             through the lse, dQ by summation); routed and tile steps per head piece (heads.py:
             the partials within dk + dv's bytes under GQA)
  bwd.py     delta, dK/dV per key tile over own-block rows and the routed rows of its blocks
No gradient flows through the gate (the selection is piecewise constant; ref.py likewise).
"""
from __future__ import annotations

from typing import Optional

import torch

from attn.common.checks import check_cu_values, check_qkv
from attn.common.customop import autograd_op_or_body, op_or_body
from attn.common.documents import block_table
from attn.dispatch import INTERPRET, impl_for
from attn.moba.ref import moba_attn_ref

_HEAD_DIMS = (16, 32, 64, 128)
MAX_TOPK = 16  # the gate keeps its running top-(k−1) in registers


def _check(q, k, v, block_size, topk, q_offset, scale=None, cu_seqlens=None, impl="ref"):
    triton = impl == "triton"
    check_qkv("moba_attn", q, k, v, q_offset=q_offset, cu_seqlens=cu_seqlens,
              head_dims=_HEAD_DIMS if triton else None, contiguous=triton)
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"moba_attn: block_size={block_size!r} must be an int >= 1")
    if not isinstance(topk, int) or topk < 1:
        raise ValueError(f"moba_attn: topk={topk!r} must be an int >= 1 (it counts the query's "
                         "own block)")
    if scale is not None and not float(scale) > 0:
        raise ValueError(f"moba_attn: scale={scale!r} must be > 0")
    if not triton:
        return
    if topk > MAX_TOPK:
        raise ValueError(f"moba_attn: topk={topk} must be <= {MAX_TOPK} for the Triton kernels")
    B, tq, hq, _ = q.shape
    tk = k.shape[1]
    # T·H·D may pass 2^31 (the kernels offset rows in int64); the routing index and the
    # positions stay int32
    if B * hq * tq * max(topk - 1, 1) >= 2 ** 31:
        raise ValueError(f"moba_attn: B*Hq*Tq*(topk-1)={B * hq * tq * max(topk - 1, 1)} must be "
                         "< 2**31 (the routing index stores int32 entry positions)")
    if tk >= 2 ** 30:
        raise ValueError(f"moba_attn: Tk={tk} must be < 2**30 (int32 positions; the kernels use "
                         "2**30 as 'past every key')")


def moba_fwd(q, k, v, *, block_size: int = 512, topk: int = 3, scale=None, cu_seqlens=None,
             q_offset: int = 0):
    """Triton forward primitive (no autograd): (o, lse [B, Hq, Tq] fp32, sel, table, index);
    sel (chosen blocks), table (block table) and index (their inverse, None for topk == 1) are
    what moba_bwd needs besides o and lse."""
    from attn.moba.fwd import fwd_triton
    from attn.moba.gate import select_blocks
    scale = float(q.shape[3] ** -0.5 if scale is None else scale)
    table = block_table(cu_seqlens, k.shape[1], block_size, q.device)
    sel = select_blocks(q, k, table, topk, q_offset)
    index = _routed_index(sel, table, topk)
    o, lse = fwd_triton(q, k, v, sel, table, scale, q_offset, index, block_size,
                        cu_seqlens is not None)
    return o, lse, sel, table, index


def _routed_index(sel, table, topk):
    """The inverse index of sel (None when nothing is routed, topk == 1)."""
    if topk == 1:
        return None
    from attn.moba.index import routed_entries_triton
    from attn.moba.routed import routed_entries
    # the interpreter's tl.sort is slow (~0.1 s per tile): there the torch sort builds the same
    # index (tests/attn/moba/test_moba_index.py checks the two agree bit for bit)
    build_index = routed_entries if INTERPRET else routed_entries_triton
    return build_index(sel, table[2].numel())


def moba_bwd(do, q, k, v, o, lse, sel, table, index, *, scale=None, q_offset: int = 0,
             block_size=None, cu_seqlens=None):
    """Triton backward primitive: (dq, dk, dv) from dO and moba_fwd's o, lse, sel, table, index
    (block_size and cu_seqlens as given to moba_fwd; block_size None: masks kept everywhere)."""
    from attn.moba.bwd import bwd_triton
    scale = float(q.shape[3] ** -0.5 if scale is None else scale)
    return bwd_triton(do.contiguous(), q, k, v, o, lse, sel, table, scale, q_offset, index,
                      block_size, cu_seqlens is not None)


# The Triton forward and backward as PyTorch custom ops: torch.compile sees one opaque op per
# attention call and compiles the model around it; eager calls run the same bodies without the
# dispatcher (attn/common/customop.py). A custom op's outputs need shapes known from its inputs'
# shapes. Without documents they are: NB = cdiv(Tk, block_size), so the forward also returns the
# inverse index (ROWPTR [B·Hq·NB + 1], ENTRIES [B·Hq·Tq·NSEL]: 4 bytes per (row, slot)) and the
# backward reuses it. With documents the block count is data-dependent: the forward returns
# empty index tensors and the backward rebuilds table and index from sel and cu_seqlens (one
# counting sort over sel, a handful of O(Tk) torch ops and one host sync for the table;
# docs/moba_notes.md).
def _index_shapes(B, tq, hq, tk, block_size, topk, has_docs):
    """Shapes of the index tensors the forward op returns (empty when the backward rebuilds)."""
    if has_docs or topk == 1:
        return (0,), (0,)
    return (B * hq * -(-tk // block_size) + 1,), (B * hq * tq * (topk - 1),)


def _moba_fwd_body(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                 block_size: int, topk: int, cu_seqlens: Optional[torch.Tensor],
                 q_offset: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                         torch.Tensor]:
    check_cu_values(cu_seqlens, k.shape[1])
    # the kernels assume the contiguous layout; a compiled graph could hand other strides
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    o, lse, sel, _, index = moba_fwd(q, k, v, block_size=block_size, topk=topk, scale=scale,
                                     cu_seqlens=cu_seqlens, q_offset=q_offset)
    if cu_seqlens is not None or index is None:
        rowptr, entries = sel.new_empty((0,)), sel.new_empty((0,))  # outputs must not alias
    else:
        rowptr, entries = index
    B, tq, hq, _ = q.shape
    shapes = _index_shapes(B, tq, hq, k.shape[1], block_size, topk, cu_seqlens is not None)
    if (rowptr.shape, entries.shape) != shapes:  # the fake below must promise the same shapes
        raise RuntimeError(f"moba_fwd: index shapes {tuple(rowptr.shape)}, "
                           f"{tuple(entries.shape)} differ from {shapes}")
    return o, lse, sel, rowptr, entries


_moba_fwd_op = torch.library.custom_op("longctx::moba_fwd", mutates_args=())(_moba_fwd_body)


@_moba_fwd_op.register_fake
def _(q, k, v, scale, block_size, topk, cu_seqlens, q_offset):
    B, tq, hq, _ = q.shape
    rowptr, entries = _index_shapes(B, tq, hq, k.shape[1], block_size, topk,
                                    cu_seqlens is not None)
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty((B, hq, tq), dtype=torch.float32),
            q.new_empty((B, hq, tq, max(topk - 1, 1)), dtype=torch.int32),
            q.new_empty(rowptr, dtype=torch.int32), q.new_empty(entries, dtype=torch.int32))


def _moba_bwd_body(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 o: torch.Tensor, lse: torch.Tensor, sel: torch.Tensor, rowptr: torch.Tensor,
                 entries: torch.Tensor, scale: float, block_size: int, topk: int,
                 cu_seqlens: Optional[torch.Tensor],
                 q_offset: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v, o, lse, sel = (t.contiguous() for t in (q, k, v, o, lse, sel))
    table = block_table(cu_seqlens, k.shape[1], block_size, q.device)
    if rowptr.numel():
        index = (rowptr.contiguous(), entries.contiguous())   # the forward's
    else:
        index = _routed_index(sel, table, topk)
    return moba_bwd(do, q, k, v, o, lse, sel, table, index, scale=scale, q_offset=q_offset,
                    block_size=block_size, cu_seqlens=cu_seqlens)


_moba_bwd_op = torch.library.custom_op("longctx::moba_bwd", mutates_args=())(_moba_bwd_body)
_moba_bwd = op_or_body(_moba_bwd_op, _moba_bwd_body)


@_moba_bwd_op.register_fake
def _(do, q, k, v, o, lse, sel, rowptr, entries, scale, block_size, topk, cu_seqlens, q_offset):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _moba_setup(ctx, inputs, output):
    q, k, v, scale, block_size, topk, cu_seqlens, q_offset = inputs
    o, lse, sel, rowptr, entries = output
    ctx.save_for_backward(q, k, v, o, lse, sel, rowptr, entries, cu_seqlens)
    ctx.args = (scale, block_size, topk, q_offset)
    ctx.mark_non_differentiable(lse, sel, rowptr, entries)
    ctx.set_materialize_grads(False)  # no zero gradients built for lse, sel and the index


def _moba_backward(ctx, do, _dlse, _dsel, _drowptr, _dentries):
    q, k, v, o, lse, sel, rowptr, entries, cu_seqlens = ctx.saved_tensors
    scale, block_size, topk, q_offset = ctx.args
    dq, dk, dv = _moba_bwd(do, q, k, v, o, lse, sel, rowptr, entries, scale, block_size, topk,
                              cu_seqlens, q_offset)
    return dq, dk, dv, None, None, None, None, None


_moba_fwd_op.register_autograd(_moba_backward, setup_context=_moba_setup)
_moba_fwd = autograd_op_or_body(_moba_fwd_op, _moba_fwd_body, _moba_setup, _moba_backward)


def moba_attn(q, k, v, *, block_size: int = 512, topk: int = 3, scale=None, cu_seqlens=None,
              q_offset: int = 0):
    """MoBA attention, [B, T, H, D] layout (see ref.py for the definition); differentiable."""
    impl = impl_for(q)
    _check(q, k, v, block_size, topk, q_offset, scale, cu_seqlens, impl)
    if impl == "ref":
        return moba_attn_ref(q, k, v, block_size=block_size, topk=topk, scale=scale,
                             cu_seqlens=cu_seqlens, q_offset=q_offset)
    scale = float(q.shape[3] ** -0.5 if scale is None else scale)
    return _moba_fwd(q, k, v, scale, block_size, topk, cu_seqlens, q_offset)[0]
