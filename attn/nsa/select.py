"""NSA's top-n block selection on chip: per query p and KV head h, score[j] = Σ over the group's
heads g and the compressed rows c overlapping selection block j of exp(q_g·k_cmp[c]·scale −
lse_cmp[g, p]) (the compressed branch's probabilities, recomputed from its lse); the group takes
its `topk` best blocks among 0 .. qrel (p's block), always block 0, qrel and qrel − 1; ties go to
the earlier block (ref.py's stable sort). Output SEL int32 [B, Tq, Hkv, topk]: global ids of
block_table(cu_seqlens, Tk, sel_block) in rank order, −1 in unused slots. Geometry (checked):
R = sel_block / cmp_stride a power of 2 and cmp_block ≤ sel_block + cmp_stride, so compressed
row c overlaps block c // R and at most the next one ("spill").

Memory plan (_select_kernel): one program per (query tile of BQ queries of ONE document, batch·KV
head), rows the BQ × G (query, head) pairs (M = BQ·GP, GP = G padded to a power of 2). Registers:
Q [M, D], lse [M]; per chunk of J blocks (CB = J·R compressed rows, read once per tile) the
scores [M, CB], block sums by MMA with a 0/1 matrix W [CB, J] (P in two fp16 parts: fp32
accuracy; with one compressed row per block and no spill, R = 1, P itself), summed over the
heads into a segment [BQ, NS, J] that is merged every NS chunks into the running top-n [BQ, TP]
(values, ids). Nothing of size T × T/stride or T × n_blocks is stored.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from attn.common import alloc
from attn.common.documents import key_doc_bounds
from attn.common.jit import LOG2E, LOG2E_F, mma
from attn.common.launch import dot_precision, reg_cap
from attn.dispatch import INTERPRET

NEG_INF = tl.constexpr(float("-inf"))
P_SCALE = tl.constexpr(16384.0)  # 2^14: probabilities scaled into fp16's normal range (see kernel)
P_SCALE_LOG2 = tl.constexpr(14.0)  # log2(P_SCALE), taken off the lse so exp2 returns P·P_SCALE
# Launch constants: the sweep's fastest (docs/nsa_notes.md, "Selection launch")
MAX_SEG_ELEMS = 4096  # block scores a program keeps in registers (BQ × NS × J fp32)
GPU_ROWS = 128        # (query, head) rows per program on the GPU
GPU_WARPS = 8         # warps per program
GPU_STAGES = 2        # software-pipeline depth of the compressed-key loads
# registers per thread: at most 128 lets two 8-warp programs share an SM (65536 registers per
# SM), so one's MMAs overlap the other's exp2 / block sums; ptxas spills a little under the
# cap (docs/nsa_notes.md has the sizes)
GPU_MAXNREG = 128


@triton.jit
def _chunk(jc, q, lse2, n_vis, vis_max, kc_base, w, out_c, qrel, n_chunks, run_v, run_i, seg_v,
           carry, qk_scale, HKV: tl.constexpr, HEAD_DIM: tl.constexpr, BQ: tl.constexpr,
           GP: tl.constexpr, J: tl.constexpr, R: tl.constexpr, NS: tl.constexpr,
           TOPK: tl.constexpr, TP: tl.constexpr, HAS_SPILL: tl.constexpr, MASKED: tl.constexpr,
           DOT_PREC: tl.constexpr):
    """One chunk of J selection blocks (J·R compressed rows): scores, block sums, segment slot,
    and every NS chunks (or at the last one) the merge into the running top-n. MASKED: some
    row of the tile does not see every compressed row of the chunk (the kernel's last chunks);
    else no visibility test at all (rows past the tile or padding heads have lse2 = +inf, so
    their P is 0 anyway)."""
    CB: tl.constexpr = J * R
    offs_c = tl.arange(0, CB)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_j = tl.arange(0, J)
    slot_s = tl.arange(0, NS)
    j0 = jc * J
    c_rel = j0 * R + offs_c
    # the chunk's first compressed row in int64 (Tc·Hkv·D may pass 2^31), int32 inside it
    kc_ptr = kc_base + tl.cast(j0 * R, tl.int64) * (HKV * HEAD_DIM) \
        + (offs_c[:, None] * (HKV * HEAD_DIM) + offs_d[None, :])
    if MASKED:
        kc = tl.load(kc_ptr, mask=(c_rel < vis_max)[:, None], other=0.0)
    else:
        kc = tl.load(kc_ptr)
    # P·2^14 straight from exp2 (lse2 holds the lse minus 14: one FFMA + EX2 per score); the
    # block sums P·W by two fp16 MMAs, as accurate as fp32 sums: P·2^14 (≤ 16384, in fp16's
    # range) = hi + lo in fp16 keeps 22 significant bits down to P ≈ 1.5e-5 and absolute steps
    # of 2^-38 below; products by 0/1 weights are exact, sums in fp32
    p_s = tl.math.exp2(mma(q, tl.trans(kc), None, DOT_PREC) * qk_scale - lse2[:, None])
    if MASKED:
        p_s = tl.where(c_rel[None, :] < n_vis[:, None], p_s, 0.0)          # [M, CB]
    if (R == 1) and (not HAS_SPILL):
        # one compressed row per selection block (fla's geometry): W is the identity, the
        # block sums are P itself (exact fp32, no split, no MMA)
        score = p_s
    else:
        p_hi = p_s.to(tl.float16)
        p_lo = (p_s - p_hi.to(tl.float32)).to(tl.float16)
        score = mma(p_hi, w, None, "tf32")
        score = mma(p_lo, w, score, "tf32")
        if HAS_SPILL:
            score += tl.where(offs_j[None, :] == 0, carry[:, None], 0.0)
            carry = tl.sum(tl.where(out_c[None, :], p_s, 0.0), axis=1)
    score = score * (1.0 / P_SCALE)                                     # [M, J] (exact rescale)
    blk = tl.sum(tl.reshape(score, [BQ, GP, J]), axis=1)          # [BQ, J]
    j_abs = j0 + offs_j
    cand = j_abs[None, :] <= qrel[:, None]
    forced = cand & ((j_abs[None, :] == 0) | (j_abs[None, :] >= qrel[:, None] - 1))
    blk = tl.where(forced, float("inf"), tl.where(cand, blk, NEG_INF))
    s = jc % NS
    seg_v = tl.where(slot_s[None, :, None] == s, blk[:, None, :], seg_v)
    if (s == NS - 1) | (jc == n_chunks - 1):
        seg_i = (jc - s) * J + slot_s[None, :, None] * J + offs_j[None, None, :]  # [1, NS, J]
        run_v, run_i = _merge_rounds(seg_v, seg_i, run_v, run_i, BQ, TOPK, TP)
        seg_v = tl.full([BQ, NS, J], NEG_INF, tl.float32)
    return run_v, run_i, seg_v, carry


@triton.jit
def _merge_rounds(seg_v, seg_i, run_v, run_i, BQ: tl.constexpr, TOPK: tl.constexpr,
                  TP: tl.constexpr):
    """The segment merged into the running top-n: TOPK rounds of (max, smallest block id) over
    both; slots TOPK .. TP − 1 end empty (−inf, −1)."""
    slot_t = tl.arange(0, TP)
    new_v = tl.full([BQ, TP], NEG_INF, tl.float32)
    new_i = tl.full([BQ, TP], -1, tl.int32)
    for k in tl.static_range(TOPK):
        m = tl.maximum(tl.max(tl.max(seg_v, 2), 1), tl.max(run_v, 1))            # [BQ]
        ids = tl.minimum(
            tl.min(tl.min(tl.where(seg_v == m[:, None, None], seg_i, 2 ** 30), 2), 1),
            tl.min(tl.where(run_v == m[:, None], run_i, 2 ** 30), 1))
        ids = tl.where(m > NEG_INF, ids, -1)
        new_v = tl.where(slot_t[None, :] == k, m[:, None], new_v)
        new_i = tl.where(slot_t[None, :] == k, ids[:, None], new_i)
        seg_v = tl.where(seg_i == ids[:, None, None], NEG_INF, seg_v)
        run_v = tl.where(run_i == ids[:, None], NEG_INF, run_v)
    return new_v, new_i


@triton.jit
def _select_kernel(Q, KC, LSE, SEL, ITEM_START, ITEM_END, DSTART, CMP0, FIRSTB,
                   qk_scale, q_offset, Tq, Tc,
                   HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
                   BQ: tl.constexpr, HEAD_DIM: tl.constexpr, J: tl.constexpr, R: tl.constexpr,
                   NS: tl.constexpr, TOPK: tl.constexpr, TP: tl.constexpr,
                   CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr, SEL_BLOCK: tl.constexpr,
                   HAS_SPILL: tl.constexpr, HAS_DOCS: tl.constexpr, DOT_PREC: tl.constexpr):
    start = tl.load(ITEM_START + tl.program_id(0))
    if start < 0:                       # spare work item (documents give fewer tiles)
        return
    end = tl.load(ITEM_END + tl.program_id(0))
    pid_bh = tl.program_id(1)
    b = pid_bh // HKV
    hkv = pid_bh % HKV
    M: tl.constexpr = BQ * GP
    CB: tl.constexpr = J * R
    if HAS_DOCS:
        dstart = tl.load(DSTART + start)
        cmp0 = tl.load(CMP0 + start)
        fb = tl.load(FIRSTB + start)
    else:
        dstart = 0
        cmp0 = 0
        fb = 0

    # rows r = (query qi, head g): r = qi·GP + g
    offs_r = tl.arange(0, M)
    qi_r = offs_r // GP
    g_r = offs_r % GP
    pos_r = start + qi_r
    row_ok = (pos_r < end) & (g_r < G)
    h_r = hkv * G + g_r
    offs_d = tl.arange(0, HEAD_DIM)
    q_rows = (b.to(tl.int64) * Tq + (pos_r - q_offset)) * HQ + h_r
    q = tl.load(Q + q_rows[:, None] * HEAD_DIM + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    # lse in the log2 domain minus log2(P_SCALE), so exp2 gives P·P_SCALE; +inf (a row that
    # sees no compressed block, or no row at all) makes P = 0
    lse2 = tl.load(LSE + (b.to(tl.int64) * HQ + h_r) * Tq + (pos_r - q_offset), mask=row_ok,
                   other=float("inf")) * LOG2E - P_SCALE_LOG2
    rel_r = pos_r - dstart
    # compressed rows visible to a row: c < n_vis = ⌊(rel − cmp_block + 1)/stride⌋ + 1
    n_vis = tl.where(rel_r >= CMP_BLOCK - 1, (rel_r - CMP_BLOCK + 1) // CMP_STRIDE + 1, 0)
    n_vis = tl.where(row_ok, n_vis, 0)
    vis_max = tl.max(n_vis, 0)

    # per query of the tile
    offs_q = tl.arange(0, BQ)
    pos_q = start + offs_q
    q_ok = pos_q < end
    qrel = tl.where(q_ok, (pos_q - dstart) // SEL_BLOCK, -1)    # block holding the query
    n_blocks = (end - 1 - dstart) // SEL_BLOCK + 1             # blocks 0 .. qrel of the last row

    # W [CB, J] (0/1, exact in fp16): compressed row c of a chunk counts for its primary block
    # c // R and, when it spills, for the next one; the last block's spill goes to the next chunk
    offs_c = tl.arange(0, CB)
    offs_j = tl.arange(0, J)
    prim_c = offs_c // R
    spill_c = (offs_c % R) * CMP_STRIDE + CMP_BLOCK > SEL_BLOCK  # row also overlaps block + 1
    w = (prim_c[:, None] == offs_j[None, :])
    if HAS_SPILL:
        w = w | (spill_c[:, None] & (prim_c[:, None] + 1 == offs_j[None, :]))
    out_c = spill_c & (prim_c == J - 1)                            # spills past the chunk
    w = tl.where(w, 1.0, 0.0).to(tl.float16)      # (the interpreter casts bool to 16-bit as 0)
    slot_t = tl.arange(0, TP)
    kc_base = KC + (b.to(tl.int64) * Tc + cmp0) * (HKV * HEAD_DIM) + hkv * HEAD_DIM

    run_v = tl.full([BQ, TP], NEG_INF, tl.float32)
    run_i = tl.full([BQ, TP], -1, tl.int32)
    seg_v = tl.full([BQ, NS, J], NEG_INF, tl.float32)
    carry = tl.zeros([M], dtype=tl.float32)
    n_chunks = tl.cdiv(n_blocks, J)
    # chunks that every row of the tile sees whole (no visibility test), then the rest; each
    # loop is flat (its K loads have no condition around them, so they are software-pipelined)
    n_whole = tl.minimum(tl.min(tl.where(row_ok, n_vis, Tc), 0) // CB, n_chunks)
    for jc in range(0, n_whole):
        run_v, run_i, seg_v, carry = _chunk(
            jc, q, lse2, n_vis, vis_max, kc_base, w, out_c, qrel, n_chunks, run_v, run_i, seg_v,
            carry, qk_scale, HKV, HEAD_DIM, BQ, GP, J, R, NS, TOPK, TP, HAS_SPILL, False,
            DOT_PREC)
    for jc in range(n_whole, n_chunks):
        run_v, run_i, seg_v, carry = _chunk(
            jc, q, lse2, n_vis, vis_max, kc_base, w, out_c, qrel, n_chunks, run_v, run_i, seg_v,
            carry, qk_scale, HKV, HEAD_DIM, BQ, GP, J, R, NS, TOPK, TP, HAS_SPILL, True,
            DOT_PREC)
    out = tl.where(run_i >= 0, fb + run_i, -1)
    sel_ptr = SEL + ((b.to(tl.int64) * Tq + (pos_q - q_offset)) * HKV + hkv)[:, None] * TOPK \
        + slot_t[None, :]
    tl.store(sel_ptr, out, mask=q_ok[:, None] & (slot_t[None, :] < TOPK))


def check_geometry(cmp_block: int, cmp_stride: int, sel_block: int, topk: int):
    """The Triton path's rules on the block sizes (see the module docstring)."""
    r = sel_block // cmp_stride
    if sel_block % cmp_stride or r & (r - 1):
        raise ValueError(f"attn.sel_block={sel_block} must be a power-of-2 multiple of "
                         f"attn.cmp_stride={cmp_stride} for the Triton kernels (ATTN_IMPL=ref "
                         "takes any)")
    if cmp_block > sel_block + cmp_stride:
        raise ValueError(f"attn.cmp_block={cmp_block} must be <= attn.sel_block + "
                         f"attn.cmp_stride = {sel_block + cmp_stride} for the Triton kernels (a "
                         "compressed block overlaps at most two selection blocks)")
    if topk > 32:
        raise ValueError(f"attn.topk={topk} must be <= 32 for the Triton kernels")


def work_items(tq: int, q_offset: int, bq: int, cu_seqlens, device):
    """(ITEM_START, ITEM_END) int32: query tiles of at most bq positions inside one document,
    covering q_offset .. q_offset+tq−1; spare items (start −1) pad the list to a size known
    without reading cu_seqlens on the host."""
    q0, q1 = q_offset, q_offset + tq
    if cu_seqlens is None:
        start = q0 + torch.arange(triton.cdiv(tq, bq), device=device, dtype=torch.int64) * bq
        return start.to(torch.int32), start.clamp(max=q1).add(bq).clamp(max=q1).to(torch.int32)
    cu = cu_seqlens.to(device).long()
    n = cu.numel() - 1
    a, e = cu[:-1].clamp(q0, q1), cu[1:].clamp(q0, q1)
    tiles = (e - a + bq - 1) // bq
    cum = torch.cumsum(tiles, 0)
    k = torch.arange(triton.cdiv(tq, bq) + n, device=device)
    d = torch.searchsorted(cum, k, right=True)
    dc = d.clamp(max=n - 1)
    start = a[dc] + (k - (cum[dc] - tiles[dc])) * bq
    end = torch.minimum(start + bq, e[dc])
    start = torch.where(d < n, start, torch.full_like(start, -1))
    return start.to(torch.int32), end.to(torch.int32)


def select_blocks(q, k_cmp, lse, table, *, scale: float, cmp_block: int, cmp_stride: int,
                  sel_block: int, topk: int, cu_seqlens=None, cu_cmp=None, q_offset: int = 0):
    """SEL int32 [B, Tq, Hkv, topk] (see the module docstring). q [B, Tq, Hq, D]; k_cmp
    [B, Tc, Hkv, D] and lse [B, Hq, Tq] (natural log, +inf for rows without a visible compressed
    block) from the compressed branch; table = block_table(cu_seqlens, Tk, sel_block);
    cu_cmp = cmp_cu_seqlens(cu_seqlens, ...) with documents."""
    check_geometry(cmp_block, cmp_stride, sel_block, topk)
    B, tq, hq, d = q.shape
    tc, hkv = k_cmp.shape[1], k_cmp.shape[2]
    g = hq // hkv
    gp = triton.next_power_of_2(g)
    rows = 16 if INTERPRET else GPU_ROWS                   # target M = BQ·GP
    bq = max(1, rows // gp)
    r = sel_block // cmp_stride
    j = max(16, 64 // r) if not INTERPRET else 16          # blocks per chunk (dot: ≥ 16)
    kblk, firstb, _, _ = table
    tk = kblk.numel()
    doc_blocks = triton.next_power_of_2(triton.cdiv(tk, sel_block))
    ns = max(1, min(MAX_SEG_ELEMS // (bq * j), triton.cdiv(doc_blocks, j)))
    ns = triton.next_power_of_2(ns)
    if ns * j * bq > MAX_SEG_ELEMS:
        ns = max(1, ns // 2)
    start, end = work_items(tq, q_offset, bq, cu_seqlens, q.device)
    has_docs = cu_seqlens is not None
    if has_docs:
        dstart, _ = key_doc_bounds(cu_seqlens, tk)
        # first compressed row of each key position's document
        doc = torch.searchsorted(cu_seqlens.long()[1:], torch.arange(tk, device=q.device),
                                 right=True)
        cmp0 = cu_cmp.long()[doc].to(torch.int32).contiguous()
    else:
        dstart = cmp0 = firstb
    sel = alloc.empty((B, tq, hkv, topk), torch.int32, q.device)
    _select_kernel[(start.numel(), B * hkv)](
        q, k_cmp, lse, sel, start, end, dstart, cmp0, firstb, scale * LOG2E_F, q_offset, tq, tc,
        HQ=hq, HKV=hkv, G=g, GP=gp, BQ=bq, HEAD_DIM=d, J=j, R=r, NS=ns, TOPK=topk,
        TP=triton.next_power_of_2(topk), CMP_BLOCK=cmp_block, CMP_STRIDE=cmp_stride,
        SEL_BLOCK=sel_block, HAS_SPILL=(r - 1) * cmp_stride + cmp_block > sel_block,
        HAS_DOCS=has_docs, DOT_PREC=dot_precision(q.dtype),
        num_warps=GPU_WARPS, num_stages=GPU_STAGES,
        **reg_cap(GPU_MAXNREG))
    return sel
