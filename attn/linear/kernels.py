"""Triton kernels of the linear-attention families (`linear`: no decay, `lightning`: decay).

One generic "decayed linear scan" is enough for the forward and for all three gradients. With a
per-head decay lam = exp(-slope) (slope >= 0; the `linear` family compiles the HAS_DECAY=False
variant, which has no exp at all), the kernels compute, over the rows t of one document,

    forward  (REVERSE=False):  O_t = s_intra * sum_{u<=t, same chunk} lam^(t-u) (A_t.B_u) V_u
                                   + s_inter * lam^(t-c0+1) A_t S          (c0: chunk start)
                               S  <- lam^L S + s_upd * sum_u lam^(c1-u) B_u^T V_u  (c1: chunk end-1)
    reverse  (REVERSE=True):   O_t = s_intra * sum_{u>=t, same chunk} lam^(u-t) (A_t.B_u) V_u
                                   + s_inter * lam^(c1-t) A_t S
                               S  <- lam^L S + s_upd * sum_u lam^(u-c0+1) B_u^T V_u

S being the state carried across chunks ([DA, DV], fp32, on chip). Lightning Attention-2 tiling:
inside a chunk the left product ((A B^T) * decay mask) V, across chunks the right product A S.
Every exponent above is <= 0 (decays are taken relative to chunk / segment ends or starts), so no
exp overflows, whatever the slope and the sequence length.

The roles (A, B, V, S) per use (q, k, v, o, do in [B*T, H, D], scale = softmax-style scale):
    o  = fwd(A=q,  B=k,  V=v,  S=state,    s=(scale, scale, 1))
    dq = fwd(A=do, B=v,  V=k,  S=state^T,  s=(scale, scale, 1))
    dv = rev(A=k,  B=q,  V=do, S=dstate,   s=(scale, 1, scale))
    dk = rev(A=v,  B=do, V=q,  S=dstate^T, s=(scale, 1, scale))
where state is the KV state before a segment and dstate the gradient reaching the state at a
segment's last position from everything after it (it starts from d final_state); a transpose is
only a swap of the two state strides.

Passes (a chunkwise-parallel scan over *segments* of SEG_LEN tokens, never across documents):
  1. seg_state: every (segment, head, tile) sums its own decayed B^T V   -> states [NS, H, DA, DV]
  2. state_scan: per (document, head, tile), a sequential pass over the document's segments turns
     the local sums into the state entering each segment (in place) and the final state
     (four segments' loads in flight at a time: the chain of steps is latency-bound).
  3. chunk_out: every (segment, head, DV tile) starts from its segment's state and walks its
     chunks in order, keeping S on chip (Lightning Attention-2 within the segment).
Memory plan: HBM holds only q/k/v/o (and do/dq/dk/dv) and one fp32 state per (segment, head):
NS*H*D*D*4 bytes = H*D*D*4/SEG_LEN per token (32 B per token per head at D=128, SEG_LEN 2048),
1/32 of a per-chunk state, so the traffic is essentially q/k/v/o (the forward is bound by HBM
bandwidth: pass 1 reads k, v and pass 3 reads q, k, v and writes o); the segment states are
saved for the backward (dq needs them), nothing else is. On chip, pass 3 keeps the [DA, BV] fp32
state, the [BT, BT] scores and the [BT, BV] output in registers (DA=128, BT=BV=64: 32 + 16 + 16 KB
per program) and streams A, B, V chunks through shared memory (2-stage cp.async pipeline, 90 KB).
"""
from __future__ import annotations


import triton
import triton.language as tl

# set before any kernel is defined (tests/conftest.py does it): kernels then run on CPU tensors
from attn.dispatch import INTERPRET  # noqa: E402

# Tokens per segment, the unit of parallelism of passes 1 and 3 and the step of the sequential
# pass 2; the launch (op._Layout) halves it, down to 512, while a call has fewer than 256
# (segment, head) pairs, so that small batches still fill the GPU. 2048 = 32 chunks of 64: a
# 32k-token batch at H = 16 gives 256 (segment, head) pairs, 512 pass-3 programs at BV = 64.
# H200, 32k tokens (docs/benchmarks.md): 2048 against 1024 cuts the forward by 7-12 % (fewer
# segment states to write, scan and read) and the backward by ~6 %. Must be a multiple of every BT
# below.
SEG_LEN = 2048
MIN_PAIRS = 256  # (segment, head) pairs below which the segment length is halved

# interpreter-safe dot and cast, shared with the other families (attn/triton_common.py)
from attn.triton_common import cvt as _cvt, mma as _dot  # noqa: E402


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
            v = _cvt(v.to(tl.float32) * w[:, None], v.dtype)
        acc = _dot(tl.trans(b), v, acc, DOT_PREC)
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
        o = _dot(a, _cvt(S, a.dtype), None, DOT_PREC)
        if HAS_DECAY:
            if REVERSE:
                e_out = L - 1 - offs_t
            else:
                e_out = offs_t + 1
            o = o * (tl.exp(-slope * tl.where(valid, e_out, 0).to(tl.float32)) * s_inter)[:, None]
        else:
            o = o * s_inter
        # left product inside the chunk: ((A B^T) * decay mask * s_intra) V, accumulated on o
        s = _dot(a, tl.trans(b), None, DOT_PREC)
        if HAS_DECAY:
            dist = tl.where(keep, ii - jj, 0)
            if REVERSE:
                dist = tl.where(keep, jj - ii, 0)
            s = tl.where(keep, s * tl.exp(-slope * dist.to(tl.float32)), 0.0) * s_intra
        else:
            s = tl.where(keep, s * s_intra, 0.0)
        o = _dot(_cvt(s, v.dtype), v, o, DOT_PREC)
        tl.store(o_base + rows[:, None] * (H * DV) + offs_v[None, :],
                 _cvt(o, O_ptr.dtype.element_ty), mask=valid[:, None])
        # state update: S <- lam^L S + s_upd * B^T (w V), w the decay to the chunk boundary
        if HAS_DECAY:
            if REVERSE:
                e_upd = offs_t + 1
            else:
                e_upd = L - 1 - offs_t
            w = tl.exp(-slope * tl.where(valid, e_upd, 0).to(tl.float32)) * s_upd
            S = S * tl.exp(-slope * L.to(tl.float32))
            vw = _cvt(v.to(tl.float32) * w[:, None], v.dtype)
        else:
            vw = _cvt(v.to(tl.float32) * s_upd, v.dtype)
        S = _dot(tl.trans(b), vw, S, DOT_PREC)

