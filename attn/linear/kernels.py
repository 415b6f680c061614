"""Triton kernels of the linear-attention families (`linear`: no decay, `lightning`: a per-head
decay lam = exp(-slope), slope >= 0; HAS_DECAY=False compiles a variant without any exp).

One generic chunked scan with roles (A, B, V, S) serves the forward and every gradient (the
roles: docs/lightning_notes.md). Forward (REVERSE=False), over the rows t of one document:
O_t = s_intra Σ_{u<=t, same chunk} lam^(t-u) (A_t.B_u) V_u + s_inter lam^(t-c0+1) A_t S and
S <- lam^L S + s_upd Σ_u lam^(c1-u) B_u^T V_u (c0, c1: the chunk's first and last row); the
reverse scan mirrors it (u >= t, decays towards the chunk start). Every exponent is <= 0, so no
exp overflows. Passes over segments of SEG_LEN tokens that never cross a document:
  1. seg_state   every (segment, head, tile) sums its own decayed B^T V -> states [NS, H, DA, DV]
  2. state_scan  per (document, head, tile) a sequential walk over its segments turns the sums
                 into the state entering each segment (in place) and the final state
  3. chunk_out   every (segment, head, DV tile) walks its chunks from its segment's state
Memory plan: HBM holds q/k/v/o (do/dq/dk/dv) and one fp32 state per (segment, head), H·D²·4 /
SEG_LEN bytes per token (saved for the backward). Pass 3 keeps the [DA, BV] fp32 state, the
[BT, BT] scores and the [BT, BV] output in registers and streams A, B, V chunks through shared
memory (2-stage cp.async pipeline).
"""
from __future__ import annotations

import triton
import triton.language as tl

# (TRITON_INTERPRET=1, set before this import as tests/conftest.py does, runs the kernels on CPU
# tensors)
from attn.common.jit import cvt, mma

# Tokens per segment, the unit of parallelism of passes 1 and 3 and the step of the sequential
# pass 2; the launch (launch.seg_len) halves it, down to 512, while a call has fewer than 256
# (segment, head) pairs, so that small batches still fill the GPU. 2048 = 32 chunks of 64: a
# 32k-token batch at H = 16 gives 256 (segment, head) pairs, 512 pass-3 programs at BV = 64;
# longer segments mean fewer states to write, scan and read (docs/lightning_notes.md). Must be
# a multiple of every BT in launch.py's configs.
SEG_LEN = 2048
MIN_PAIRS = 256  # (segment, head) pairs below which the segment length is halved


@triton.jit
def _segment(i, seg_tab, T, NSEG, SEG: tl.constexpr, VARLEN: tl.constexpr):
    """(document, first row, end row) of segment i; rows index the flattened [B*T] tokens.
    Without documents, batch row b is document b and owns segments b*NSEG .. b*NSEG+NSEG-1."""
    if VARLEN:
        doc = tl.load(seg_tab + 3 * i)
        start = tl.load(seg_tab + 3 * i + 1)
        end = tl.load(seg_tab + 3 * i + 2)
    else:
        doc = i // NSEG
        start = doc * T + (i - doc * NSEG) * SEG
        end = tl.minimum(start + SEG, doc * T + T)
    return doc, start, end


# ----------------------------------------------------------------------------------- pass 1
@triton.jit
def seg_state_kernel(B_ptr, V_ptr, slopes_ptr, out_ptr, seg_tab, T, NSEG, s_upd,
                     H: tl.constexpr, DA: tl.constexpr, DV: tl.constexpr,
                     BA: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr, SEG: tl.constexpr,
                     REVERSE: tl.constexpr, HAS_DECAY: tl.constexpr, VARLEN: tl.constexpr,
                     DOT_PREC: tl.constexpr):
    """out[seg, h] = s_upd * sum_{u in seg} w_u B_u^T V_u, w_u = lam^(end-1-u) (forward) or
    lam^(u-start+1) (reverse). Grid (NS*H*(DA/BA)*(DV/BV),): the tiles of one (segment, head)
    are neighbours (they read the same rows, which then hit L2)."""
    pid = tl.program_id(0)
    NV: tl.constexpr = DV // BV
    NA: tl.constexpr = DA // BA
    iv = pid % NV
    ia = (pid // NV) % NA
    ish = pid // (NV * NA)
    seg = ish // H
    h = ish % H
    doc, start, end = _segment(seg, seg_tab, T, NSEG, SEG, VARLEN)
    offs_a = ia * BA + tl.arange(0, BA)
    offs_v = iv * BV + tl.arange(0, BV)
    offs_t = tl.arange(0, BT)
    acc = tl.zeros([BA, BV], dtype=tl.float32)
    slope = 0.0
    if HAS_DECAY:
        slope = tl.load(slopes_ptr + h)
    b_base = B_ptr + start.to(tl.int64) * (H * DA) + h * DA
    v_base = V_ptr + start.to(tl.int64) * (H * DV) + h * DV
    n = tl.cdiv(end - start, BT)
    for c in range(0, n):
        rows = c * BT + offs_t  # int32 offsets inside the segment
        valid = rows < end - start
        b = tl.load(b_base + rows[:, None] * (H * DA) + offs_a[None, :], mask=valid[:, None],
                    other=0.0)
        v = tl.load(v_base + rows[:, None] * (H * DV) + offs_v[None, :], mask=valid[:, None],
                    other=0.0)
        if HAS_DECAY:
            if REVERSE:
                dist = rows + 1
            else:
                dist = end - start - 1 - rows
            w = tl.exp(-slope * tl.where(valid, dist, 0).to(tl.float32))
            v = cvt(v.to(tl.float32) * w[:, None], v.dtype)
        acc = mma(tl.trans(b), v, acc, DOT_PREC)
    acc = acc * s_upd
    base = (seg * H + h).to(tl.int64) * (DA * DV)
    tl.store(out_ptr + base + offs_a[:, None] * DV + offs_v[None, :], acc)


# ----------------------------------------------------------------------------------- pass 2
@triton.jit
def _scan_seg(i, s0, s1, REVERSE: tl.constexpr):
    """Segment id of step i of the walk over segments s0 .. s1-1 (a valid id past the end)."""
    if REVERSE:
        seg = s1 - 1 - i
    else:
        seg = s0 + i
    return tl.where(i < s1 - s0, seg, s0)


@triton.jit
def _scan_step(run, d, seg, ok, st_ptr, tile, slope, seg_tab, T, NSEG,
               H: tl.constexpr, DA: tl.constexpr, DV: tl.constexpr, SEG: tl.constexpr,
               HAS_DECAY: tl.constexpr, VARLEN: tl.constexpr, h):
    """Store the state entering segment seg, return the state leaving it (ok False: no-op)."""
    tl.store(st_ptr + (seg * H + h).to(tl.int64) * (DA * DV) + tile, run, mask=ok)
    nxt = run + d
    if HAS_DECAY:
        doc, start, end = _segment(seg, seg_tab, T, NSEG, SEG, VARLEN)
        nxt = run * tl.exp(-slope * (end - start).to(tl.float32)) + d
    return tl.where(ok, nxt, run)


@triton.jit
def state_scan_kernel(st_ptr, init_ptr, final_ptr, slopes_ptr, seg_tab, doc_seg, T, NSEG,
                      H: tl.constexpr, DA: tl.constexpr, DV: tl.constexpr,
                      BA: tl.constexpr, BV: tl.constexpr, SEG: tl.constexpr,
                      REVERSE: tl.constexpr, HAS_DECAY: tl.constexpr, VARLEN: tl.constexpr,
                      HAS_INIT: tl.constexpr):
    """In place over st [NS, H, DA, DV]: local sums -> the state entering each segment (in the
    scan's direction). The carried value starts at init[doc] (or 0) and ends in final[doc].
    Grid (N*H, DA/BA, DV/BV). The walk is a chain of dependent steps whose loads do not depend on
    the chain: four segments' tiles are loaded together before their four steps (four loads in
    flight per program instead of one: the pass is bound by memory latency, not bandwidth)."""
    inh = tl.program_id(0)
    ia = tl.program_id(1)
    iv = tl.program_id(2)
    n = inh // H
    h = inh % H
    if VARLEN:
        s0 = tl.load(doc_seg + n)
        s1 = tl.load(doc_seg + n + 1)
    else:
        s0 = n * NSEG
        s1 = s0 + NSEG
    offs_a = ia * BA + tl.arange(0, BA)
    offs_v = iv * BV + tl.arange(0, BV)
    tile = offs_a[:, None] * DV + offs_v[None, :]
    doc_base = (n * H + h).to(tl.int64) * (DA * DV)
    if HAS_INIT:
        run = tl.load(init_ptr + doc_base + tile)
    else:
        run = tl.zeros([BA, BV], dtype=tl.float32)
    slope = 0.0
    if HAS_DECAY:
        slope = tl.load(slopes_ptr + h)
    n_seg = s1 - s0
    step = tl.zeros([BA, BV], dtype=tl.int32)  # masks as tiles (scalar masks: not everywhere)
    for i in range(0, n_seg, 4):
        g0 = _scan_seg(i, s0, s1, REVERSE)
        g1 = _scan_seg(i + 1, s0, s1, REVERSE)
        g2 = _scan_seg(i + 2, s0, s1, REVERSE)
        g3 = _scan_seg(i + 3, s0, s1, REVERSE)
        ok0 = step + i < n_seg
        ok1 = step + i + 1 < n_seg
        ok2 = step + i + 2 < n_seg
        ok3 = step + i + 3 < n_seg
        d0 = tl.load(st_ptr + (g0 * H + h).to(tl.int64) * (DA * DV) + tile)
        d1 = tl.load(st_ptr + (g1 * H + h).to(tl.int64) * (DA * DV) + tile, mask=ok1, other=0.0)
        d2 = tl.load(st_ptr + (g2 * H + h).to(tl.int64) * (DA * DV) + tile, mask=ok2, other=0.0)
        d3 = tl.load(st_ptr + (g3 * H + h).to(tl.int64) * (DA * DV) + tile, mask=ok3, other=0.0)
        run = _scan_step(run, d0, g0, ok0, st_ptr, tile, slope, seg_tab, T, NSEG, H, DA,
                         DV, SEG, HAS_DECAY, VARLEN, h)
        run = _scan_step(run, d1, g1, ok1, st_ptr, tile, slope, seg_tab, T, NSEG, H, DA, DV,
                         SEG, HAS_DECAY, VARLEN, h)
        run = _scan_step(run, d2, g2, ok2, st_ptr, tile, slope, seg_tab, T, NSEG, H, DA, DV,
                         SEG, HAS_DECAY, VARLEN, h)
        run = _scan_step(run, d3, g3, ok3, st_ptr, tile, slope, seg_tab, T, NSEG, H, DA, DV,
                         SEG, HAS_DECAY, VARLEN, h)
    tl.store(final_ptr + doc_base + tile, run)


# ----------------------------------------------------------------------------------- pass 3
@triton.jit
def chunk_out_kernel(A_ptr, B_ptr, V_ptr, st_ptr, stride_sa, stride_sv, O_ptr, slopes_ptr,
                     seg_tab, T, NSEG, s_intra, s_inter, s_upd,
                     H: tl.constexpr, DA: tl.constexpr, DV: tl.constexpr,
                     BV: tl.constexpr, BT: tl.constexpr, SEG: tl.constexpr,
                     REVERSE: tl.constexpr, HAS_DECAY: tl.constexpr, VARLEN: tl.constexpr,
                     DOT_PREC: tl.constexpr):
    """O rows of one segment and one DV tile (see the module docstring). Grid (NS*H*(DV/BV),),
    the DV tiles of one (segment, head) adjacent (they read the same A and B rows)."""
    pid = tl.program_id(0)
    NV: tl.constexpr = DV // BV
    iv = pid % NV
    ish = pid // NV
    seg = ish // H
    h = ish % H
    doc, start, end = _segment(seg, seg_tab, T, NSEG, SEG, VARLEN)
    offs_a = tl.arange(0, DA)
    offs_v = iv * BV + tl.arange(0, BV)
    offs_t = tl.arange(0, BT)
    base = (seg * H + h).to(tl.int64) * (DA * DV)
    S = tl.load(st_ptr + base + offs_a[:, None] * stride_sa + offs_v[None, :] * stride_sv)
    ii = offs_t[:, None]
    jj = offs_t[None, :]
    if REVERSE:
        keep = jj >= ii
    else:
        keep = ii >= jj
    slope = 0.0
    if HAS_DECAY:
        slope = tl.load(slopes_ptr + h)
    # row offsets inside the segment stay int32 (SEG*H*D < 2^31); the segment's base is int64
    a_base = A_ptr + start.to(tl.int64) * (H * DA) + h * DA
    b_base = B_ptr + start.to(tl.int64) * (H * DA) + h * DA
    v_base = V_ptr + start.to(tl.int64) * (H * DV) + h * DV
    o_base = O_ptr + start.to(tl.int64) * (H * DV) + h * DV
    n = tl.cdiv(end - start, BT)
    for ci in range(0, n):
        if REVERSE:
            c = n - 1 - ci
        else:
            c = ci
        L = tl.minimum(end - start - c * BT, BT)
        valid = offs_t < L
        rows = c * BT + offs_t
        a = tl.load(a_base + rows[:, None] * (H * DA) + offs_a[None, :], mask=valid[:, None],
                    other=0.0)
        b = tl.load(b_base + rows[:, None] * (H * DA) + offs_a[None, :], mask=valid[:, None],
                    other=0.0)
        v = tl.load(v_base + rows[:, None] * (H * DV) + offs_v[None, :], mask=valid[:, None],
                    other=0.0)
        # right product with the state carried from earlier (later, REVERSE) chunks, rows
        # decayed from the chunk boundary: one [BT, BV] fp32 accumulator for the whole output
        o = mma(a, cvt(S, a.dtype), None, DOT_PREC)
        if HAS_DECAY:
            if REVERSE:
                e_out = L - 1 - offs_t
            else:
                e_out = offs_t + 1
            o = o * (tl.exp(-slope * tl.where(valid, e_out, 0).to(tl.float32)) * s_inter)[:, None]
        else:
            o = o * s_inter
        # left product inside the chunk: ((A B^T) * decay mask * s_intra) V, accumulated on o
        s = mma(a, tl.trans(b), None, DOT_PREC)
        if HAS_DECAY:
            dist = tl.where(keep, ii - jj, 0)
            if REVERSE:
                dist = tl.where(keep, jj - ii, 0)
            s = tl.where(keep, s * tl.exp(-slope * dist.to(tl.float32)), 0.0) * s_intra
        else:
            s = tl.where(keep, s * s_intra, 0.0)
        o = mma(cvt(s, v.dtype), v, o, DOT_PREC)
        tl.store(o_base + rows[:, None] * (H * DV) + offs_v[None, :],
                 cvt(o, O_ptr.dtype.element_ty), mask=valid[:, None])
        # state update: S <- lam^L S + s_upd * B^T (w V), w the decay to the chunk boundary
        if HAS_DECAY:
            if REVERSE:
                e_upd = offs_t + 1
            else:
                e_upd = L - 1 - offs_t
            w = tl.exp(-slope * tl.where(valid, e_upd, 0).to(tl.float32)) * s_upd
            S = S * tl.exp(-slope * L.to(tl.float32))
            vw = cvt(v.to(tl.float32) * w[:, None], v.dtype)
        else:
            vw = cvt(v.to(tl.float32) * s_upd, v.dtype)
        S = mma(tl.trans(b), vw, S, DOT_PREC)

