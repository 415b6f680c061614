"""Native Sparse Attention (NSA): the definition, the test oracle and the CPU path.

Three branches over the same queries, mixed by per-query, per-head gates:

- compressed: compressed block i covers keys [i·cmp_stride, i·cmp_stride + cmp_block) of its
  document and is visible to a query at position t when i·cmp_stride + cmp_block − 1 ≤ t.
  `o_cmp` is softmax attention over the visible compressed keys k_cmp/v_cmp; a query that sees
  none gets o_cmp = 0.
- selected: keys are cut into blocks of `sel_block` from each document's start. Block j scores
  the sum of the compressed attention probabilities of the compressed blocks overlapping it,
  summed over the query heads of the GQA group (the group shares one selection). The group
  attends its `topk` best causal blocks (block start ≤ t), always including block 0 and the
  two most recent (the block holding t and the one before); ties go to the earlier block.
  `o_slc` is softmax attention over those blocks' keys s ≤ t. With fewer causal blocks than
  topk, all are taken (full causal attention).
- sliding window: `flash_attn_ref(window=window)`, keys t − window < s ≤ t. window = 0: no such
  branch (the two-branch NSA of fla's parallel_nsa default), and no g_swa.

o = g_cmp·o_cmp + g_slc·o_slc + g_swa·o_swa, gates [B, T, Hq].

Compressed layout. Without cu_seqlens, k_cmp/v_cmp are [B, Tc, Hkv, D] with
Tc = ⌊(T − cmp_block)/cmp_stride⌋ + 1 (0 when T < cmp_block). With cu_seqlens (B == 1) each
document d of length L_d contributes its own Tc(L_d) blocks (never crossing a boundary) and
k_cmp/v_cmp are the per-document blocks concatenated in document order: [1, Σ_d Tc(L_d), Hkv, D],
or that padded to [1, Tc(Tk), Hkv, D] with unused trailing rows (Σ_d Tc(L_d) ≤ Tc(Tk): cmp_block
≥ cmp_stride). `compress` returns the padded form: its row count comes from the shapes, not from
cu_seqlens' values, so torch.compile traces it without a host read. Every function here tells
the two forms apart by the row count. `cmp_cu_seqlens` gives the boundaries over the compressed
axis. With q_offset the
queries are a shard at absolute positions q_offset.. against the full keys and the full
compressed keys described by cu_seqlens (for a key prefix [0, end), as all-gather CP passes,
that is the compressed blocks complete inside the prefix: exactly those visible to its queries).

Dense masks: O(Tq·Tk) memory, for tests and short CPU runs only. The selection (indices) carries
no gradient; everything else is differentiable w.r.t. q, k, v, k_cmp, v_cmp and the gates.
"""
from __future__ import annotations

import torch

from attn.common.checks import check_cu_seqlens
from attn.flash.ref import flash_attn_ref
from attn.masks import document_ids


def num_cmp_blocks(length: int, cmp_block: int, cmp_stride: int) -> int:
    """Complete compressed blocks in a document of `length` keys."""
    return 0 if length < cmp_block else (length - cmp_block) // cmp_stride + 1


def cmp_cu_seqlens(cu_seqlens: torch.Tensor, cmp_block: int, cmp_stride: int) -> torch.Tensor:
    """int32 [N+1]: boundaries of each document's compressed blocks in the concatenated
    k_cmp/v_cmp (document d owns compressed rows cu_cmp[d] .. cu_cmp[d+1]-1)."""
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    n = torch.where(lens >= cmp_block, (lens - cmp_block).div(cmp_stride, rounding_mode="floor") + 1,
                    torch.zeros_like(lens))
    return torch.cat([n.new_zeros(1), n.cumsum(0)]).to(torch.int32)


def cmp_block_starts(tk: int, cmp_block: int, cmp_stride: int, cu_seqlens=None, device=None,
                     rows=None):
    """(absolute start position, document start) of every compressed row, int64 [rows] each,
    in the layout above. With cu_seqlens, rows = Tc(Tk) (the no-document count) asks for the
    padded form, built by device ops alone: its unused rows start at 0 with document start −1
    (no query's document); any other rows (None: the exact count) the exact form."""
    if cu_seqlens is None:  # host arithmetic only: no copy to or from the device
        c = torch.arange(num_cmp_blocks(tk, cmp_block, cmp_stride), device=device)
        return c * cmp_stride, torch.zeros_like(c)
    cu = cu_seqlens.to(device)
    padded = num_cmp_blocks(tk, cmp_block, cmp_stride)
    if rows == padded:
        return _block_starts(cu, cmp_block, cmp_stride, padded, device)
    return _exact_block_starts(cu, cmp_block, cmp_stride, device)


def _block_starts(cu, cmp_block: int, cmp_stride: int, rows: int, device):
    """Starts of `rows` compressed rows, the documents' blocks first; rows past them (a padded
    layout's) start at 0 with document start −1."""
    cu_c = cmp_cu_seqlens(cu, cmp_block, cmp_stride).long()
    c = torch.arange(rows, device=device)
    used = c < cu_c[-1]
    # the whole boundary list, not cu_c[1:]: inductor's CUDA searchsorted rejects a sliced
    # boundary tensor (a SliceView, torch 2.11); cu_c[0] = 0 <= c adds the 1
    doc = (torch.searchsorted(cu_c, c, right=True) - 1).clamp(max=cu_c.numel() - 2)
    dstart = cu.long()[doc]
    start = dstart + (c - cu_c[doc]) * cmp_stride
    return torch.where(used, start, 0), torch.where(used, dstart, -1)


# The exact layout's row count is read off cu_seqlens. Under torch.compile this runs outside the
# graph (a graph break; the starts enter the graph with a dynamic size): traced with an unbacked
# block count, inductor's code hits a device-side assert (torch 2.11,
# tests/parallel/test_compile.py::test_gpu_inductor_model_matches_eager[nsa-*]).
@torch.compiler.disable
def _exact_block_starts(cu, cmp_block: int, cmp_stride: int, device):
    tc = int(cmp_cu_seqlens(cu, cmp_block, cmp_stride)[-1])
    return _block_starts(cu, cmp_block, cmp_stride, tc, device)


def cmp_rows(tk: int, cmp_block: int, cmp_stride: int, cu_seqlens, rows: int) -> int:
    """The compressed row count k_cmp must have when it has `rows`: Tc(Tk) without documents;
    with them `rows` itself if that is the padded count Tc(Tk), else the exact count (one host
    read of cu_seqlens)."""
    padded = num_cmp_blocks(tk, cmp_block, cmp_stride)
    if cu_seqlens is None or rows == padded:
        return padded
    return int(cmp_cu_seqlens(cu_seqlens, cmp_block, cmp_stride)[-1])


def _doc_starts(cu_seqlens, tk: int, device) -> torch.Tensor:
    if cu_seqlens is None:
        return torch.zeros(tk, dtype=torch.long, device=device)
    cu = cu_seqlens.to(device).long()
    return cu[document_ids(cu_seqlens.to(device), tk)]


def _masked_softmax(s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis restricted to `mask`; rows with nothing visible give zeros
    (and zero gradient), never NaN."""
    s = s.masked_fill(~mask, torch.finfo(s.dtype).min)
    return s.softmax(-1) * mask


def selection_scores(p_cmp, tk: int, *, cmp_block, cmp_stride, sel_block, cu_seqlens=None,
                     q_offset=0, hkv=1):
    """(score [B, Hkv, Tq, NB], gid [Tk]): the selection score of every block (global numbering
    over the documents, as attn.common.documents.block_table) for every query and KV head, from
    the compressed probabilities p_cmp [B, Hq, Tq, Tc]: the sum over compressed blocks overlapping
    the block and over the group's heads; +inf for the forced blocks (block 0, the query's block
    and the one before), −inf for blocks that are not candidates (later, or another document).
    gid: the block of every key."""
    B, hq, tq, tc = p_cmp.shape
    dev, ct = p_cmp.device, p_cmp.dtype
    kstart = _doc_starts(cu_seqlens, tk, dev)
    qpos = torch.arange(tq, device=dev) + q_offset
    qstart = kstart[qpos]
    cstart, cdoc = cmp_block_starts(tk, cmp_block, cmp_stride, cu_seqlens, dev, rows=tc)
    kpos = torch.arange(tk, device=dev)
    krel = (kpos - kstart) // sel_block
    gid = torch.unique(kstart * (tk + 1) + krel, return_inverse=True)[1]  # [Tk]
    nb = int(gid.max()) + 1
    bfirst = torch.full((nb,), tk, dtype=torch.long, device=dev).scatter_reduce(
        0, gid, kpos, reduce="amin")
    bdoc, brel = kstart[bfirst], krel[bfirst]                            # [nb]
    qrel = (qpos - qstart) // sel_block                                  # [Tq]
    cand = (bdoc[None, :] == qstart[:, None]) & (brel[None, :] <= qrel[:, None])
    forced = cand & ((brel[None, :] == 0) | (brel[None, :] >= qrel[:, None] - 1))
    # compressed block c overlaps selection block j (same document, doc-relative ranges)
    c_rel = cstart - cdoc
    overlap = ((cdoc[:, None] == bdoc[None, :])
               & (c_rel[:, None] < (brel[None, :] + 1) * sel_block)
               & (c_rel[:, None] + cmp_block > brel[None, :] * sel_block)).to(ct)  # [Tc, nb]
    with torch.no_grad():
        score = p_cmp.detach().reshape(B, hkv, hq // hkv, tq, tc).sum(2) @ overlap
        score = score.masked_fill(forced, float("inf")).masked_fill(~cand, float("-inf"))
    return score, gid


def nsa_branches(q, k, v, k_cmp, v_cmp, *, cmp_block=32, cmp_stride=16, sel_block=64, topk=16,
                 window=512, scale=None, cu_seqlens=None, q_offset=0):
    """(o_cmp, o_slc, o_swa, selected): each o [B, Tq, Hq, D] in the compute dtype (fp32, or
    float64 for float64 inputs; o_swa None when window = 0); selected bool [B, Hkv, Tq, Tk] (the
    selected-branch key mask)."""
    B, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    dev = q.device
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, B, tk)
    scale = d ** -0.5 if scale is None else scale
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf = q.to(ct).transpose(1, 2)                                        # [B, Hq, Tq, D]

    kstart = _doc_starts(cu_seqlens, tk, dev)                            # [Tk] doc start of key
    qpos = torch.arange(tq, device=dev) + q_offset
    qstart = kstart[qpos]                                                # [Tq]

    # ---- compressed branch
    cstart, cdoc = cmp_block_starts(tk, cmp_block, cmp_stride, cu_seqlens, dev,
                                    rows=k_cmp.shape[1])                   # [Tc]
    cmask = (cdoc[None, :] == qstart[:, None]) & (cstart[None, :] + cmp_block - 1 <= qpos[:, None])
    kc = k_cmp.to(ct).transpose(1, 2).repeat_interleave(g, dim=1)       # [B, Hq, Tc, D]
    vc = v_cmp.to(ct).transpose(1, 2).repeat_interleave(g, dim=1)
    p_cmp = _masked_softmax((qf @ kc.transpose(-1, -2)) * scale, cmask)  # [B, Hq, Tq, Tc]
    o_cmp = (p_cmp @ vc).transpose(1, 2)

    # ---- selection
    score, gid = selection_scores(p_cmp, tk, cmp_block=cmp_block, cmp_stride=cmp_stride,
                                  sel_block=sel_block, cu_seqlens=cu_seqlens, q_offset=q_offset,
                                  hkv=hkv)
    kpos = torch.arange(tk, device=dev)
    with torch.no_grad():
        order = torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :topk]
        chosen = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, order, True) \
            & (score > float("-inf"))
        sel = chosen.gather(-1, gid[None, None, None, :].expand(B, hkv, tq, tk))
        sel &= kpos[None, None, None, :] <= qpos[None, None, :, None]    # [B, Hkv, Tq, Tk]
    kf = k.to(ct).transpose(1, 2).repeat_interleave(g, dim=1)           # [B, Hq, Tk, D]
    vf = v.to(ct).transpose(1, 2).repeat_interleave(g, dim=1)
    p_slc = _masked_softmax((qf @ kf.transpose(-1, -2)) * scale, sel.repeat_interleave(g, dim=1))
    o_slc = (p_slc @ vf).transpose(1, 2)

    # ---- sliding window
    o_swa = None if window == 0 else flash_attn_ref(
        q.to(ct), k.to(ct), v.to(ct), scale=scale, cu_seqlens=cu_seqlens, q_offset=q_offset,
        window=window)[0]
    return o_cmp, o_slc, o_swa, sel


def check_window(window: int, g_swa, fn: str) -> None:
    """window >= 1 with its gate g_swa, or window = 0 (no window branch) with g_swa None."""
    if window < 0:
        raise ValueError(f"{fn}: window={window} must be >= 1, or 0 for no sliding-window branch")
    if (window == 0) != (g_swa is None):
        raise ValueError(f"{fn}: window={window} with g_swa "
                         f"{'None' if g_swa is None else 'given'}: g_swa is given exactly when "
                         "window >= 1 (window=0, g_swa=None: no window branch)")


def nsa_attn_ref(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_swa, *, cmp_block=32, cmp_stride=16,
                 sel_block=64, topk=16, window=512, scale=None, cu_seqlens=None, q_offset=0):
    """NSA output [B, Tq, Hq, D] in q's dtype (fp32 math, float64 for float64 inputs); window=0
    with g_swa=None: without the sliding-window branch."""
    check_window(window, g_swa, "nsa_attn_ref")
    o_cmp, o_slc, o_swa, _ = nsa_branches(
        q, k, v, k_cmp, v_cmp, cmp_block=cmp_block, cmp_stride=cmp_stride, sel_block=sel_block,
        topk=topk, window=window, scale=scale, cu_seqlens=cu_seqlens, q_offset=q_offset)
    ct = o_cmp.dtype
    o = g_cmp.to(ct)[..., None] * o_cmp + g_slc.to(ct)[..., None] * o_slc
    if o_swa is not None:
        o = o + g_swa.to(ct)[..., None] * o_swa
    return o.to(q.dtype)


# ---- branch oracles for the Triton kernels (attn/nsa/cmp.py, attn/nsa/slc.py)

def cmp_attn_ref(q, k_cmp, v_cmp, *, cmp_block=32, cmp_stride=16, scale=None, cu_seqlens=None,
                 q_offset=0, tk=None):
    """Compressed-branch attention alone: (o [B, Tq, Hq, D] in q's dtype, lse [B, Hq, Tq] fp32,
    natural log). Query i (absolute position p = q_offset + i) sees the compressed rows of its
    document whose block ends at or before p (see the module docstring); a row that sees none gets
    o = 0 and lse = +inf (so exp(s − lse) = 0 for every key in the backward and in selection).
    `tk` is the length of the key sequence the compressed rows came from (default: covers the
    queries, q_offset + Tq; with cu_seqlens, cu_seqlens[-1])."""
    B, tq, hq, d = q.shape
    hkv = k_cmp.shape[2]
    g = hq // hkv
    tk = (int(cu_seqlens[-1]) if cu_seqlens is not None else q_offset + tq) if tk is None else tk
    dev = q.device
    scale = d ** -0.5 if scale is None else scale
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    kstart = _doc_starts(cu_seqlens, tk, dev)
    qpos = torch.arange(tq, device=dev) + q_offset
    cstart, cdoc = cmp_block_starts(tk, cmp_block, cmp_stride, cu_seqlens, dev,
                                    rows=k_cmp.shape[1])
    cmask = (cdoc[None, :] == kstart[qpos][:, None]) \
        & (cstart[None, :] + cmp_block - 1 <= qpos[:, None])             # [Tq, Tc]
    qf = q.to(ct).transpose(1, 2)
    kc = k_cmp.to(ct).transpose(1, 2).repeat_interleave(g, dim=1)
    vc = v_cmp.to(ct).transpose(1, 2).repeat_interleave(g, dim=1)
    s = (qf @ kc.transpose(-1, -2)) * scale
    lse = s.masked_fill(~cmask, float("-inf")).logsumexp(-1)            # [B, Hq, Tq]
    lse = torch.where(cmask.any(-1), lse, torch.full_like(lse, float("inf")))
    o = _masked_softmax(s, cmask) @ vc
    return o.transpose(1, 2).to(q.dtype), lse.float()


def slc_attn_ref(q, k, v, sel, blk_start, blk_end, *, scale=None, q_offset=0):
    """Selected-branch attention for a given selection: (o [B, Tq, Hq, D] in q's dtype,
    lse [B, Hq, Tq] fp32). sel int32 [B, Tq, Hkv, NSEL]: global block ids chosen by the query's
    GQA group (−1: empty slot; a block listed twice counts once); block j covers keys
    [blk_start[j], blk_end[j]); query i at p = q_offset + i sees the keys s ≤ p of its blocks.
    Every row must see at least one key (NSA always selects the block holding p)."""
    B, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    dev = q.device
    scale = d ** -0.5 if scale is None else scale
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    nb = blk_start.numel()
    kpos = torch.arange(tk, device=dev)
    blk_of_key = torch.full((tk,), -1, dtype=torch.long, device=dev)
    for j in range(nb):
        blk_of_key[int(blk_start[j]):int(blk_end[j])] = j
    chosen = torch.zeros(B, tq, hkv, nb + 1, dtype=torch.bool, device=dev)
    chosen.scatter_(-1, torch.where(sel >= 0, sel.long(), nb), True)
    mask = chosen[..., :nb].gather(-1, blk_of_key.clamp_min(0).expand(B, tq, hkv, tk)) \
        & (blk_of_key >= 0)                                              # [B, Tq, Hkv, Tk]
    mask &= kpos <= (torch.arange(tq, device=dev) + q_offset)[None, :, None, None]
    mask = mask.permute(0, 2, 1, 3).repeat_interleave(g, dim=1)          # [B, Hq, Tq, Tk]
    qf = q.to(ct).transpose(1, 2)
    kf = k.to(ct).transpose(1, 2).repeat_interleave(g, dim=1)
    vf = v.to(ct).transpose(1, 2).repeat_interleave(g, dim=1)
    s = (qf @ kf.transpose(-1, -2)) * scale
    lse = s.masked_fill(~mask, float("-inf")).logsumexp(-1)
    o = _masked_softmax(s, mask) @ vf
    return o.transpose(1, 2).to(q.dtype), lse.float()
