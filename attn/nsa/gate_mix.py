"""NSA's gated sum of the branch outputs: o = g_cmp·o_cmp + g_slc·o_slc + g_swa·o_swa (NBR = 3
branches), or o = g_cmp·o_cmp + g_slc·o_slc (NBR = 2: a layer without the window branch,
window = 0). The gates come as G [rows, NBR].

Forward: mix_rows, in the selected branch's epilogue (slc.py; it runs last, so o_cmp and o_swa
exist, and o_slc is mixed from registers as stored instead of being read back by another pass).
The backward is one pass over the rows (token, head). Both work in fp32 registers, so the sum
is rounded once (as ref.py's fp32 math) and no fp32 [T, H, D] temporaries exist.

Backward memory plan: one program per BLOCK_R rows of [B·T·H, D]; it loads dO, the NBR branch
rows [BLOCK_R, D] and the gates [BLOCK_R, NBR] (G [.., NBR] with the branches on the last
axis); it writes dO_i = g_i·dO (NBR [BLOCK_R, D] stores in the input dtype) and
dg_i = Σ_d dO·O_i (fp32, stored in the gates' dtype); optionally each branch's attention delta
rowsum(dO_i·O_i) (fp32 [NBR, B, H, T], from the rounded dO_i the branch backward reads), which the
branch kernels would otherwise compute in NBR more passes over O_i and dO_i.

Folded backward (gate_mix_bwd_folded, gates >= 0): no dO_i at all. A branch's softmax backward
with dO_i = g·dO is its backward with dO itself and P_i scaled by g per row (dV = Σ (g·P)ᵀ dO,
dS = (g·P) ⊙ (dO Vᵀ − rowsum(dO·O_i))), and g·P = exp(s − (lse − ln g)): each branch gets the
unchanged dO, lse_i − ln g_i as its lse and rowsum(dO·O_i) (= dg_i, unrounded) as its delta. The
pass then writes only [NBR, B, H, T] rows instead of NBR [T, H, D] tensors (3 GB at 64k, 64
heads, 3 branches). g = 0 gives lse +inf: P = 0, no gradient, as g·dO = 0 would.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from attn.common import alloc
from attn.common.jit import cvt
from attn.dispatch import INTERPRET


@triton.jit
def mix_rows(o1, o2, o3, G, grow, ok, NBR: tl.constexpr):
    """g1·o1 + g2·o2 (+ g3·o3 when NBR = 3; o3 unused otherwise) in fp32 ([R, D] each, fp32)
    with the gates of rows grow (int64) of G [rows, NBR]; the one place of the forward's
    arithmetic."""
    g1 = tl.load(G + grow * NBR, mask=ok, other=0.0).to(tl.float32)
    g2 = tl.load(G + grow * NBR + 1, mask=ok, other=0.0).to(tl.float32)
    g3 = g2  # NBR = 2: not used
    if NBR == 3:
        g3 = tl.load(G + grow * NBR + 2, mask=ok, other=0.0).to(tl.float32)
    o = g1[:, None] * o1
    o += g2[:, None] * o2
    if NBR == 3:
        o += g3[:, None] * o3
    return o


@triton.jit
def _mix_bwd_branch(do, O, DO_I, LSE_I, LSE_G, G, I: tl.constexpr, rows, ok, off, DG, DELTA,
                    d_off, n_rows, HAS_DELTA: tl.constexpr, FOLD: tl.constexpr,
                    NBR: tl.constexpr):
    g = tl.load(G + rows.to(tl.int64) * NBR + I, mask=ok, other=0.0).to(tl.float32)
    o = tl.load(O + off, mask=ok[:, None], other=0.0).to(tl.float32)
    dg = tl.sum(do * o, 1)
    tl.store(DG + rows.to(tl.int64) * NBR + I, cvt(dg, DG.dtype.element_ty), mask=ok)
    # entry of branch I in the [NBR, B, H, T] outputs, int64 (NBR·B·T·H may pass 2^31)
    i_off = d_off + tl.cast(n_rows, tl.int64) * I
    if FOLD:  # lse − ln g (+inf where g = 0) and delta = dg (module docstring)
        lse = tl.load(LSE_I + d_off, mask=ok, other=0.0)
        lse_g = tl.where(g > 0, lse - tl.log(tl.where(g > 0, g, 1.0)), float("inf"))
        tl.store(LSE_G + i_off, lse_g, mask=ok)
        tl.store(DELTA + i_off, dg, mask=ok)
    else:
        do_i = cvt(g[:, None] * do, DO_I.dtype.element_ty)
        tl.store(DO_I + off, do_i, mask=ok[:, None])
        if HAS_DELTA:
            tl.store(DELTA + i_off, tl.sum(do_i.to(tl.float32) * o, 1), mask=ok)


@triton.jit
def _mix_bwd_kernel(DO, O1, O2, O3, G, DO1, DO2, DO3, LSE1, LSE2, LSE3, LSE_G, DG, DELTA, n_rows,
                    T, H, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr,
                    HAS_DELTA: tl.constexpr, FOLD: tl.constexpr, NBR: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = rows < n_rows
    offs_d = tl.arange(0, HEAD_DIM)
    off = rows.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :]
    # row (b·T + t)·H + h of [B, T, H] is entry (b·H + h)·T + t of a branch's delta [B, H, T]
    bt = rows.to(tl.int64) // H
    d_off = ((bt // T) * H + rows % H) * T + bt % T
    do = tl.load(DO + off, mask=ok[:, None], other=0.0).to(tl.float32)
    _mix_bwd_branch(do, O1, DO1, LSE1, LSE_G, G, 0, rows, ok, off, DG, DELTA, d_off, n_rows,
                    HAS_DELTA, FOLD, NBR)
    _mix_bwd_branch(do, O2, DO2, LSE2, LSE_G, G, 1, rows, ok, off, DG, DELTA, d_off, n_rows,
                    HAS_DELTA, FOLD, NBR)
    if NBR == 3:
        _mix_bwd_branch(do, O3, DO3, LSE3, LSE_G, G, 2, rows, ok, off, DG, DELTA, d_off, n_rows,
                        HAS_DELTA, FOLD, NBR)


def _block_rows(d: int) -> int:
    return 16 if INTERPRET else max(1, 4096 // d)


def _branches(o3, gates) -> int:
    """NBR of a call: gates [.., 3] with o3, or [.., 2] with o3 None (no window branch)."""
    nbr = gates.shape[-1]
    if nbr not in (2, 3) or (o3 is None) != (nbr == 2):
        raise ValueError(f"gates [.., {nbr}] with o3 {'None' if o3 is None else 'given'}: "
                         "need gates [.., 3] with the third branch or [.., 2] without it")
    return nbr


def gate_mix_bwd(do, o1, o2, o3, gates, deltas=None):
    """(do1, do2, do3, dgates) for o = Σ_i gates[..., i]·o_i; o1, o2 (, o3) contiguous
    [B, T, H, D] (o3 None when gates are [.., 2]), do like them (do3 None when o3 is).
    deltas: None, or a contiguous fp32 [NBR, B, H, T] tensor that receives rowsum(do_i·o_i)
    for each branch i."""
    nbr = _branches(o3, gates)
    B, T, H, d = o1.shape
    n = B * T * H
    if deltas is not None and (deltas.shape != (nbr, B, H, T) or deltas.dtype != torch.float32
                               or not deltas.is_contiguous()):
        raise ValueError(f"deltas {tuple(deltas.shape)} {deltas.dtype} must be contiguous "
                         f"float32 [NBR, B, H, T] = {(nbr, B, H, T)}")
    dos = [alloc.empty(o1.shape, o1.dtype, o1.device) for _ in range(nbr)]
    dg = alloc.empty(gates.shape, gates.dtype, gates.device)
    br = _block_rows(d)
    _mix_bwd_kernel[(triton.cdiv(n, br),)](do, o1, o2, o1 if o3 is None else o3, gates,
                                           dos[0], dos[1], dos[-1], dg, dg, dg, dg, dg,
                                           dg if deltas is None else deltas, n, T, H,
                                           HEAD_DIM=d, BLOCK_R=br,
                                           HAS_DELTA=deltas is not None, FOLD=False, NBR=nbr,
                                           num_warps=4)
    return dos[0], dos[1], dos[2] if nbr == 3 else None, dg


def gate_mix_bwd_folded(do, o1, o2, o3, gates, lses):
    """(dgates, lse_g, deltas) for the same sum with every gate >= 0 (the caller knows; a
    negative gate would count as 0): the branches' backwards then take dO itself with lse_g[i]
    as their lse and deltas[i] as their delta (module docstring). lses: the NBR branches'
    forward lse, fp32 [B, H, T] each; lse_g, deltas fp32 [NBR, B, H, T]."""
    nbr = _branches(o3, gates)
    B, T, H, d = o1.shape
    n = B * T * H
    if len(lses) != nbr:
        raise ValueError(f"lses: {len(lses)} given for {nbr} branches")
    for i, t in enumerate(lses):
        if t.shape != (B, H, T) or t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"lses[{i}] {tuple(t.shape)} {t.dtype} must be contiguous float32 "
                             f"[B, H, T] = {(B, H, T)}")
    lse_g, deltas = (alloc.empty((nbr, B, H, T), torch.float32, o1.device) for _ in range(2))
    dg = alloc.empty(gates.shape, gates.dtype, gates.device)
    br = _block_rows(d)
    _mix_bwd_kernel[(triton.cdiv(n, br),)](do, o1, o2, o1 if o3 is None else o3, gates, do, do,
                                           do, lses[0], lses[1], lses[-1], lse_g, dg, deltas, n,
                                           T, H, HEAD_DIM=d, BLOCK_R=br, HAS_DELTA=True,
                                           FOLD=True, NBR=nbr, num_warps=4)
    return dg, lse_g, deltas
