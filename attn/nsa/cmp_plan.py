"""NSA compressed branch: what its forward (cmp.py) and backward (cmp_bwd.py) kernels share: the
argument checks and plan (host), and the query tile's bounds (Triton).

Masking. Query row i (absolute position p = q_offset + i) sees the compressed rows
[c_lo(p), c_hi(p)): c_lo is the first compressed row of p's document (0 without documents),
c_hi = c_lo + #{r >= 0 : r*stride + cmp_block - 1 <= p_rel} (p_rel: position in the document),
capped at the document's rows; c_hi == c_lo: the row sees nothing (o = 0, lse = +inf). Both
bounds are non-decreasing in p, so a query tile sees [c_lo(first), c_hi(last)) and each of its
rows sees [c_lo(last), c_hi(first)): key tiles inside the latter run unmasked, those around it
masked, all others are never loaded. Dually compressed row c is seen by the positions
[pf(c), pl(c)] (its block's last key .. its document's last position), which bounds the query
tiles of the dK/dV kernel. Without documents the Triton kernels compute the bounds; with
cu_seqlens they come as int32 arrays built by torch ops on the device (no host sync in the
padded layout; the exact layout's row-count check reads one value). The Gluon kernels
(NSA_CMP_IMPL=gluon) read them as arrays in both cases (row_bounds, key_bounds).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from attn.common.checks import check_cu_seqlens, check_qkv
from attn.common.launch import pick_dim
from attn.dispatch import INTERPRET
from attn.flash.common import gluon_chosen, impl_setting
from attn.nsa.ref import cmp_cu_seqlens, cmp_rows

# NSA_CMP_IMPL: the compressed branch's kernels (attn/nsa/cmp.py), Gluon or Triton
# (attn/flash/common.py's impl_setting)
CMP_IMPL = impl_setting("NSA_CMP_IMPL", "auto")
HEAD_DIMS = (16, 32, 64, 128)
BIG = tl.constexpr(2 ** 30)  # past every position and every compressed row (int32 sentinel)
INTERP_BLOCKS = (16, 16, 4, 1)  # interpreter: small tiles, many tile edges


def gluon_kernels(q, k_cmp, kernel: str) -> bool:
    """Whether the compressed branch runs its Gluon kernels (NSA_CMP_IMPL; kernel names the one
    asking, for the error): ValueError when they are demanded outside their scope (a Hopper GPU,
    fwd_gluon.scope_error's inputs)."""
    def scope():
        from attn.flash.fwd_gluon import scope_error
        return scope_error(q, k_cmp)
    return gluon_chosen("NSA_CMP_IMPL", CMP_IMPL, q, kernel, scope)


@triton.jit
def q_tile(pid_m, pid_bh, q_offset, CLO, CHI, cmp_block, cmp_stride, Tq, Tc,
           HQ: tl.constexpr, HKV: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
           BLOCK_N: tl.constexpr, HAS_DOCS: tl.constexpr):
    """Shared by the forward and dQ programs (one query tile of one (batch, query head)): row
    offsets, the KV head's bases, per-row bounds [lo, hi) and the key ranges [kv_lo, f_lo)
    masked, [f_lo, f_hi) unmasked, [f_hi, kv_hi) masked (bounds monotone in the row, so
    min/max are the first/last valid row's)."""
    b = pid_bh // HQ
    h = pid_bh % HQ
    kv_base = b.to(tl.int64) * Tc * (HKV * HEAD_DIM) + (h // (HQ // HKV)) * HEAD_DIM
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = rows < Tq
    # int64 base of the query tile (Tq·Hq·D may pass 2^31), int32 offsets inside it
    q_off = (b.to(tl.int64) * Tq + pid_m * BLOCK_M) * (HQ * HEAD_DIM) + h * HEAD_DIM \
        + (tl.arange(0, BLOCK_M)[:, None] * (HQ * HEAD_DIM) + tl.arange(0, HEAD_DIM)[None, :])
    if HAS_DOCS:
        lo = tl.load(CLO + rows, mask=r_ok, other=0)
        hi = tl.load(CHI + rows, mask=r_ok, other=0)
    else:
        x = q_offset + rows - cmp_block + 1  # position minus the first block's last key
        hi = tl.where(x >= 0, tl.maximum(x, 0) // cmp_stride + 1, 0)
        hi = tl.where(r_ok, tl.minimum(hi, Tc), 0)  # padding rows: empty
        lo = hi * 0
    lo_last = tl.max(tl.where(r_ok, lo, 0), 0)
    hi_first = tl.min(tl.where(r_ok, hi, BIG), 0)
    kv_lo = (tl.min(tl.where(r_ok, lo, BIG), 0) // BLOCK_N) * BLOCK_N
    kv_hi = tl.max(tl.where(r_ok, hi, 0), 0)
    f_lo = tl.maximum(tl.cdiv(lo_last, BLOCK_N) * BLOCK_N, kv_lo)
    f_hi = (hi_first // BLOCK_N) * BLOCK_N
    if f_hi <= f_lo:  # no key tile is seen by every row: one masked range
        f_lo = kv_lo
        f_hi = kv_lo
    return rows, r_ok, q_off, kv_base, lo, hi, kv_lo, f_lo, f_hi, kv_hi


@triton.jit
def tile_load(ptrs, ok, MASKED: tl.constexpr, OTHER: tl.constexpr = 0.0):
    """tl.load, with the mask only in masked tiles (unmasked tiles lie inside the tensors)."""
    if MASKED:
        x = tl.load(ptrs, mask=ok, other=OTHER)
    else:
        x = tl.load(ptrs)
    return x


# dK/dV row splits: the first compressed tiles are seen by nearly every query row, so one
# program per key tile leaves the heaviest program G * Tq rows of work. The rows are cut into
# chunks (fp32 partials, summed in a fixed order) until the grid has about DKDV_PROGRAMS
# programs, each chunk at least DKDV_MIN_ROWS rows (interpreter: INTERP_CHUNK rows, so the
# tests cover several splits).
DKDV_PROGRAMS = 2048
DKDV_MIN_ROWS = 1024
INTERP_CHUNK = 64


def dkdv_chunk(tq, n_progs, bm):
    """Query rows per dK/dV split (a multiple of bm)."""
    if INTERPRET:
        return INTERP_CHUNK
    splits = max(1, min(triton.cdiv(DKDV_PROGRAMS, n_progs), tq // DKDV_MIN_ROWS))
    return triton.cdiv(triton.cdiv(tq, splits), bm) * bm


def launch_cfg(table, d, dtype):
    """(BLOCK_M, BLOCK_N, warps, stages) of a kernel from its per-head-dim table."""
    return INTERP_BLOCKS if INTERPRET else table[pick_dim(table, d, dtype)]


def _check(q, k_cmp, v_cmp, cmp_block, cmp_stride, cu_seqlens, q_offset, tk):
    """Validate the arguments (ValueError naming the rule); returns tk."""
    check_qkv("cmp_attn", q, k_cmp, v_cmp, names=("q", "k_cmp", "v_cmp"), head_dims=HEAD_DIMS,
              contiguous=True)
    B, tq = q.shape[:2]
    for name, val in (("cmp_block", cmp_block), ("cmp_stride", cmp_stride)):
        if not isinstance(val, int) or val < 1:
            raise ValueError(f"cmp_attn: {name}={val!r} must be an int >= 1")
    if not isinstance(q_offset, int) or q_offset < 0:
        raise ValueError(f"cmp_attn: q_offset={q_offset!r} must be an int >= 0")
    if cu_seqlens is not None and (not isinstance(cu_seqlens, torch.Tensor)
                                   or cu_seqlens.device != q.device):
        raise ValueError(f"cmp_attn: cu_seqlens must be a tensor on q's device ({q.device})")
    if tk is None:
        tk = q_offset + tq if cu_seqlens is None else int(cu_seqlens[-1])
    if not isinstance(tk, int) or q_offset + tq > tk:
        raise ValueError(f"cmp_attn: tk={tk!r} must be an int >= q_offset + Tq = {q_offset + tq} "
                         f"(q_offset={q_offset}): queries sit inside the key sequence")
    # (T·H·D may pass 2^31: the kernels offset rows in int64; positions stay int32)
    if tk >= 2 ** 30:
        raise ValueError(f"cmp_attn: tk={tk} must be < 2**30 (int32 positions; the kernels use "
                         "2**30 as 'past every position')")
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, B, tk, "cmp_attn: ")
    return tk


class CmpPlan:
    """Checked arguments and, with documents, the int32 bound arrays (module docstring)."""

    def __init__(self, q, k_cmp, v_cmp, scale, cmp_block, cmp_stride, cu_seqlens, q_offset, tk):
        tk = _check(q, k_cmp, v_cmp, cmp_block, cmp_stride, cu_seqlens, q_offset, tk)
        B, tq, hq, d = q.shape
        tc, hkv = k_cmp.shape[1], k_cmp.shape[2]
        want = cmp_rows(tk, cmp_block, cmp_stride, cu_seqlens, tc)
        if tc != want:
            raise ValueError(f"cmp_attn: k_cmp has {tc} compressed rows (dim 1), but tk={tk} keys "
                             f"with cmp_block={cmp_block}, cmp_stride={cmp_stride}"
                             f"{' and these cu_seqlens' if cu_seqlens is not None else ''} make "
                             f"{want} (complete blocks per document, or with documents the "
                             f"padded no-document count; see attn/nsa/ref.py)")
        self.bounds = None
        if cu_seqlens is not None and tc > 0 and tq > 0:
            cu_c = cmp_cu_seqlens(cu_seqlens, cmp_block, cmp_stride)
            self.bounds = _doc_bounds(cu_seqlens, cu_c, tq, tc, q_offset, cmp_block, cmp_stride)
        self.scale = float(d ** -0.5 if scale is None else scale)
        self.cmp_block, self.cmp_stride, self.q_offset = cmp_block, cmp_stride, q_offset
        self.shape = (B, tq, hq, d, tc, hkv)
        self.device = q.device


def row_bounds(plan: CmpPlan) -> torch.Tensor:
    """int32 [2, Tq], contiguous: each query row's compressed rows [c_lo, c_hi) (module
    docstring), from the document bounds or, without documents, the stride rule (device ops
    only)."""
    if plan.bounds is not None:
        return torch.stack(plan.bounds[:2]).contiguous()
    tq, tc = plan.shape[1], plan.shape[4]
    # c_hi = #{r >= 0 : r·stride + cmp_block − 1 <= p}: (p − cmp_block + 1 + stride) // stride,
    # 0 below the first block's last key
    x = torch.arange(tq, device=plan.device) + (plan.q_offset - plan.cmp_block + 1
                                                 + plan.cmp_stride)
    hi = (x.clamp_min(0) // plan.cmp_stride).clamp_max(tc)
    return torch.stack([torch.zeros_like(hi), hi]).to(torch.int32).contiguous()


def key_bounds(plan: CmpPlan) -> torch.Tensor:
    """int32 [2, Tc], contiguous: each compressed row's query positions [pf, pl] (module
    docstring), from the document bounds or, without documents, pf = c·stride + cmp_block − 1
    and pl = the last query position (device ops only)."""
    if plan.bounds is not None:
        return torch.stack(plan.bounds[2:]).contiguous()
    tq, tc = plan.shape[1], plan.shape[4]
    pf = torch.arange(tc, device=plan.device) * plan.cmp_stride + (plan.cmp_block - 1)
    pl = torch.full_like(pf, plan.q_offset + tq - 1)
    return torch.stack([pf, pl]).to(torch.int32).contiguous()


def _doc_bounds(cu_seqlens, cu_c, tq, tc, q_offset, cmp_block, cmp_stride):
    """(c_lo, c_hi) int32 [Tq] per query row and (pf, pl) int32 [Tc] per compressed row."""
    cu, cu_c = cu_seqlens.long(), cu_c.long()
    qpos = torch.arange(q_offset, q_offset + tq, device=cu.device)
    doc = torch.searchsorted(cu[1:], qpos, right=True)
    rel = qpos - cu[doc]
    n = torch.where(rel >= cmp_block - 1, (rel - cmp_block + 1).clamp_min(0) // cmp_stride + 1,
                    torch.zeros_like(rel))
    c_lo = cu_c[doc]
    c_hi = torch.minimum(c_lo + n, cu_c[doc + 1])
    c = torch.arange(tc, device=cu.device)
    used = c < cu_c[-1]  # all rows but a padded layout's trailing ones
    cdoc = torch.searchsorted(cu_c[1:], c, right=True).clamp_(max=cu_c.numel() - 2)
    pf = cu[cdoc] + (c - cu_c[cdoc]) * cmp_stride + cmp_block - 1
    pl = cu[cdoc + 1] - 1
    # an unused row is seen by no position: the empty range [BIG, -1] (no dK/dV work, zeros)
    pf, pl = torch.where(used, pf, int(BIG)), torch.where(used, pl, -1)
    return tuple(t.to(torch.int32).contiguous() for t in (c_lo, c_hi, pf, pl))
