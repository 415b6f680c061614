"""Triton launch layer of the linear-attention families: the segment layout of a call, the
configs / autotuning of the kernels (kernels.py) and the launches of the three passes, composed
into the forward and the backward. Arguments arrive checked (op.py)."""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton

from attn.common import alloc
from attn.common.launch import dot_precision
from attn.dispatch import INTERPRET
from attn.linear import kernels as K


def seg_len(n_tokens: int, H: int) -> int:
    """Segment length of a call with n_tokens (B*T) tokens: K.SEG_LEN, halved down to 512 while
    there are fewer than K.MIN_PAIRS (segment, head) pairs."""
    seg = K.SEG_LEN
    while seg > 512 and triton.cdiv(n_tokens, seg) * H < K.MIN_PAIRS:
        seg //= 2
    return seg


def n_seg_rows(B: int, T: int, H: int, n_docs: Optional[int]) -> tuple[int, int]:
    """(segment length, rows of the segment-state tensor) from shapes alone. With documents the
    rows are an upper bound, T // seg + n_docs (a document of L tokens has ceil(L / seg) <=
    L // seg + 1 segments), so the custom op's output shapes never depend on tensor values;
    rows past the real segments are launched but empty (their programs write zeros to st)."""
    seg = seg_len(B * T, H)
    if n_docs is None:
        return seg, B * triton.cdiv(T, seg)
    return seg, T // seg + n_docs


class _Layout:
    """Segments of `seg` tokens that never cross a document (see kernels.py, passes). `cu`: None,
    or cu_seqlens (an int32 tensor, or a host list). The segment tables are built on the device
    from cu_seqlens (no host sync), over the shape-derived row count of n_seg_rows."""

    def __init__(self, B, T, H, cu, device):
        if cu is None:
            self.seg, self.ns = n_seg_rows(B, T, H, None)
            self.varlen, self.n = False, B
            self.nseg = self.ns // B
            self.seg_tab = self.doc_seg = None
            return
        cu = torch.as_tensor(cu, dtype=torch.int32, device=device)
        self.varlen, self.n, self.nseg = True, cu.numel() - 1, 1
        self.seg, self.ns = seg, ns = n_seg_rows(B, T, H, self.n)
        cu = cu.long()
        counts = (cu[1:] - cu[:-1] + seg - 1) // seg                  # segments per document
        doc_seg = torch.cat([counts.new_zeros(1), counts.cumsum(0)])  # first segment of each
        i = torch.arange(ns, device=cu.device)
        doc = torch.searchsorted(doc_seg[1:], i, right=True).clamp_(max=self.n - 1)
        start = cu[doc] + (i - doc_seg[doc]) * seg
        end = torch.minimum(start + seg, cu[doc + 1])
        pad = i >= doc_seg[-1]                                        # rows past the last segment
        start, end = start.masked_fill(pad, 0), end.masked_fill(pad, 0)
        self.seg_tab = torch.stack([doc, start, end], 1).to(torch.int32).reshape(-1)
        self.doc_seg = doc_seg.to(torch.int32)


def _autotune() -> bool:
    return not INTERPRET and os.environ.get("LINEAR_AUTOTUNE", "1") != "0"


def _clamped(configs, names, dims):
    """Configs with each tile clamped to its dimension, duplicates dropped."""
    out, seen = [], set()
    for c in configs:
        kw = dict(c.kwargs)
        for n, d in zip(names, dims):
            kw[n] = min(kw[n], d)
        key = (tuple(sorted(kw.items())), c.num_warps, c.num_stages)
        if key not in seen:
            seen.add(key)
            out.append(triton.Config(kw, num_warps=c.num_warps, num_stages=c.num_stages))
    return out


# (BT, BV, warps, stages) of pass 3; the first is the LINEAR_AUTOTUNE=0 / interpreter choice.
# BT = 64: the chunk (intra tile) of Lightning Attention-2. At D = 128, BV = 64 the [128, 64] fp32
# state, the [64, 64] fp32 scores and the [64, 64] fp32 output live in registers: compiled for
# sm_90 (tests/attn/linear/aot_compile.py) 8 warps take ~215 registers/thread without spills,
# 4 warps ~230 with small spills in the reverse variant. First: 64 x 64 with 4 warps, the
# autotuner's pick for every role at D = 128 on the H100 and the H200 (docs/lightning_notes.md).
# BV = D (one DV tile) computes each score tile once; BT = 32 halves the intra-chunk work and the
# register tiles (no spills at BV = 128) but issues smaller MMAs.
_OUT_CFGS = [(64, 64, 4, 2), (64, 64, 8, 2), (64, 32, 4, 2), (64, 128, 8, 2), (32, 128, 8, 2),
             (32, 64, 4, 2), (64, 64, 8, 3), (128, 64, 8, 2)]
# (BA, BV, BT, warps, stages) of pass 1 (a plain decayed B^T V accumulation). First: the H200
# autotuner's pick for three of its four roles (the fourth and the H100 took BV = 128).
_STATE_CFGS = [(128, 64, 64, 8, 2), (128, 128, 64, 8, 2), (64, 64, 64, 4, 2), (64, 64, 128, 4, 3),
               (64, 64, 64, 4, 3), (32, 64, 64, 4, 2)]
_SCAN_TILE = 32  # pass 2 tile edge: (D/32)^2 * N * H programs, 4 KB of fp32 state per step

_out_cfgs = [triton.Config({"BT": bt, "BV": bv}, num_warps=w, num_stages=s)
             for bt, bv, w, s in _OUT_CFGS]
_state_cfgs = [triton.Config({"BA": ba, "BV": bv, "BT": bt}, num_warps=w, num_stages=s)
               for ba, bv, bt, w, s in _STATE_CFGS]


def _prune_out(configs, named_args, **kw):
    dv = kw.get("DV", named_args.get("DV"))
    return _clamped(configs, ["BV"], [dv])


def _prune_state(configs, named_args, **kw):
    da = kw.get("DA", named_args.get("DA"))
    dv = kw.get("DV", named_args.get("DV"))
    return _clamped(configs, ["BA", "BV"], [da, dv])


_KEY = ["DA", "DV", "REVERSE", "HAS_DECAY", "VARLEN"]
# pass 3 serves four roles (o and dq walk forward, dv and dk in reverse; dq and dk read the state
# transposed): the state's stride tells the transposed roles apart, so each role is tuned on its own
_out_tuned = triton.autotune(_out_cfgs, key=_KEY + ["stride_sa"], prune_configs_by={
    "early_config_prune": _prune_out})(K.chunk_out_kernel)
_state_tuned = triton.autotune(_state_cfgs, key=_KEY, prune_configs_by={
    "early_config_prune": _prune_state})(K.seg_state_kernel)


def _seg_args(lay, x):
    # without documents the segment tables are never read: any pointer will do
    return (lay.seg_tab if lay.varlen else x), (lay.doc_seg if lay.varlen else x)


def _seg_states(Bm, V, slopes, lay, reverse, s_upd):
    """Pass 1: [NS, H, DA, DV] fp32 local sums."""
    _, _, H, DA = Bm.shape
    DV = V.shape[-1]
    T = Bm.shape[1]
    out = alloc.empty((lay.ns, H, DA, DV), torch.float32, Bm.device)
    seg_tab, _ = _seg_args(lay, Bm)
    sl = Bm if slopes is None else slopes
    meta = dict(H=H, DA=DA, DV=DV, SEG=lay.seg, REVERSE=reverse, HAS_DECAY=slopes is not None,
                  VARLEN=lay.varlen, DOT_PREC=dot_precision(Bm.dtype))
    if _autotune():
        grid = lambda m: (lay.ns * H * (DA // m["BA"]) * (DV // m["BV"]),)  # noqa: E731
        _state_tuned[grid](Bm, V, sl, out, seg_tab, T, lay.nseg, s_upd, **meta)
    else:
        ba, bv, bt, w, s = _STATE_CFGS[0]
        ba, bv = min(ba, DA), min(bv, DV)
        K.seg_state_kernel[(lay.ns * H * (DA // ba) * (DV // bv),)](
            Bm, V, sl, out, seg_tab, T, lay.nseg, s_upd, BA=ba, BV=bv, BT=bt, num_warps=w,
            num_stages=s, **meta)
    return out


def _scan(st, init, slopes, lay, reverse, T):
    """Pass 2 (in place on st); returns the carried value at the end ([N, H, DA, DV] fp32)."""
    _, H, DA, DV = st.shape
    final = alloc.empty((lay.n, H, DA, DV), torch.float32, st.device)
    seg_tab, doc_seg = _seg_args(lay, st)
    ba, bv = min(_SCAN_TILE, DA), min(_SCAN_TILE, DV)
    init = None if init is None else init.float().contiguous()
    K.state_scan_kernel[(lay.n * H, DA // ba, DV // bv)](
        st, st if init is None else init, final, st if slopes is None else slopes, seg_tab,
        doc_seg, T, lay.nseg, H=H, DA=DA, DV=DV, BA=ba, BV=bv, SEG=lay.seg, REVERSE=reverse,
        HAS_DECAY=slopes is not None, VARLEN=lay.varlen, HAS_INIT=init is not None,
        num_warps=4)
    return final


def _chunk_out(A, Bm, V, st, transposed, slopes, lay, reverse, s_intra, s_inter, s_upd):
    """Pass 3: the output rows [B, T, H, DV] in A's dtype."""
    _, T, H, DA = A.shape
    DV = V.shape[-1]
    o = alloc.empty(V.shape, A.dtype, A.device)
    sa, sv = (1, DA) if transposed else (DV, 1)
    seg_tab, _ = _seg_args(lay, A)
    sl = A if slopes is None else slopes
    meta = dict(H=H, DA=DA, DV=DV, SEG=lay.seg, REVERSE=reverse, HAS_DECAY=slopes is not None,
                  VARLEN=lay.varlen, DOT_PREC=dot_precision(A.dtype))
    args = (A, Bm, V, st, sa, sv, o, sl, seg_tab, T, lay.nseg, s_intra, s_inter, s_upd)
    if _autotune():
        _out_tuned[lambda m: (lay.ns * H * (DV // m["BV"]),)](*args, **meta)
    else:
        bt, bv, w, s = _OUT_CFGS[0]
        bv = min(bv, DV)
        K.chunk_out_kernel[(lay.ns * H * (DV // bv),)](*args, BT=bt, BV=bv, num_warps=w,
                                                       num_stages=s, **meta)
    return o


def _fwd_triton(q, k, v, slopes, scale, initial_state, lay):
    """(o, final_state, segment states) with q, k, v contiguous."""
    T = q.shape[1]
    st = _seg_states(k, v, slopes, lay, False, 1.0)
    final = _scan(st, initial_state, slopes, lay, False, T)
    o = _chunk_out(q, k, v, st, False, slopes, lay, False, scale, scale, 1.0)
    return o, final, st


def _bwd_triton(do, q, k, v, slopes, scale, st, d_final, lay):
    """(dq, dk, dv, d_initial_state) given the forward's segment states st."""
    T = q.shape[1]
    dst = _seg_states(q, do, slopes, lay, True, scale)
    d_init = _scan(dst, d_final, slopes, lay, True, T)
    dq = _chunk_out(do, v, k, st, True, slopes, lay, False, scale, scale, 1.0)
    dv = _chunk_out(k, q, do, dst, False, slopes, lay, True, scale, 1.0, scale)
    dk = _chunk_out(v, do, q, dst, True, slopes, lay, True, scale, 1.0, scale)
    return dq, dk, dv, d_init
