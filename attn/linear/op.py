"""Public ops of the linear-attention families: checks, dispatch, CP primitives, autograd.

    linear_attn(q, k, v, *, scale=None, initial_state=None, output_final_state=False,
                cu_seqlens=None) -> (o, final_state | None)
    linear_fwd(q, k, v, initial_state=None, *, scale=None, cu_seqlens=None) -> (o, final_state)
    linear_bwd(do, q, k, v, initial_state=None, d_final_state=None, *, scale=None,
               cu_seqlens=None) -> (dq, dk, dv, d_initial_state)
    linear_state(k, v, *, initial_state=None, cu_seqlens=None) -> final_state
        (differentiable; no outputs computed: LASP's first pass, about a third of a forward)
(`fwd` / `bwd` are aliases; the `lightning` family's op.py has the same three with `slopes`
after v; both call `scan_attn` / `scan_fwd` / `scan_bwd` here with slopes None or a tensor.)

Semantics (DESIGN.md): S_t = lam_h S_{t-1} + k_t^T v_t, o_t = scale q_t S_t, lam_h = exp(-slopes[h])
(1 for `linear`), S_{-1} = initial_state or 0, restarted per document with cu_seqlens.
Shapes: q, k, v [B, T, H, D] (one head count: GQA callers repeat k/v heads first), states fp32
[B or N, H, D, D] (N documents with cu_seqlens, which needs B == 1), slopes fp32 [H] >= 0, not
differentiated (constants of the layer). o in q's dtype. final_state is always fp32 (float64 on
the float64 reference path).
The fwd/bwd pair is what LASP context parallelism chains across ranks: bwd recomputes the
segment states from initial_state (cheap: two of the forward's three passes) and returns the
gradient of initial_state given that of the final state (None = 0).
Implementation: Triton (kernels.py) on CUDA tensors, ref.chunked on CPU tensors; ATTN_IMPL=
triton|ref forces one (TRITON_INTERPRET=1 with ATTN_IMPL=triton runs the kernels on CPU).
The Triton forward and backward of `scan_attn` are the custom ops longctx::scan_fwd /
longctx::scan_bwd: torch.compile sees one opaque op per call and can compile the model around
it with fullgraph=True (the primitives below stay eager).
`scan_attn(..., maps=(qk_map, v_map))` (the layer cores' path) applies the feature maps inside
the op: it saves the maps' inputs and recomputes the maps in the backward, so the mapped q, k, v
and the maps' inputs are not both kept alive.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import torch.nn.functional as F

from attn.dispatch import check_triton_inputs, impl_for
import triton

from attn.linear import kernels as K
from attn.linear import ref as R
from attn.masks import check_cu_values

_HEAD_DIMS = (16, 32, 64, 128, 256)  # powers of two: tl.arange / tl.dot tile sizes


def empty(shape, dtype, device):
    """Allocator of every kernel output (tests swap it for a NaN-filled one: rows a kernel
    forgets to write then show up)."""
    return torch.empty(shape, dtype=dtype, device=device)


_impl = impl_for  # see attn/dispatch.py


# ----------------------------------------------------------------------------- checks

def _check(fn, q, k, v, slopes, scale, initial_state, cu_seqlens, impl, decay: bool,
           values: bool = True):
    """Validate the contract (ValueError naming the argument); return (scale as a float,
    slopes (fp32 when checked) or None, cu_seqlens as a host list or None). values=False skips
    the checks that read tensor values (slopes >= 0, cu_seqlens' boundaries; they sync with the
    device and cannot run while torch.compile traces): the custom op checks them when it runs."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{fn}: {name} must be a 4-D tensor [B, T, H, D], got "
                             f"{getattr(t, 'shape', type(t))}")
    if not (q.shape == k.shape == v.shape):
        if q.shape[:2] == k.shape[:2] and k.shape == v.shape and q.shape[3] == k.shape[3]:
            raise ValueError(f"{fn}: q has {q.shape[2]} heads and k/v {k.shape[2]}: linear "
                             "attention needs one head count (repeat k/v heads for GQA)")
        raise ValueError(f"{fn}: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must "
                         "have the same shape [B, T, H, D]")
    B, T, H, D = q.shape
    if min(B, T, H, D) < 1:
        raise ValueError(f"{fn}: q {tuple(q.shape)}: B, T, H and D must all be >= 1")
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise ValueError(f"{fn}: q, k, v must share one floating dtype, got {q.dtype}, "
                         f"{k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{fn}: q, k, v must be on one device, got {q.device}, {k.device}, "
                         f"{v.device}")
    if scale is None:
        scale = D ** -0.5
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"{fn}: scale={scale!r} must be None or a finite number")
    if decay:
        if not isinstance(slopes, torch.Tensor) or slopes.shape != (H,):
            raise ValueError(f"{fn}: slopes must be a tensor [H={H}] (one decay rate per head), "
                             f"got {getattr(slopes, 'shape', type(slopes))}")
        if slopes.device != q.device or not slopes.dtype.is_floating_point:
            raise ValueError(f"{fn}: slopes must be a floating tensor on q's device ({q.device})")
        if values:
            slopes = _checked_slopes(fn, slopes)
    n_states, cu_list = B, None
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.device != q.device:
            raise ValueError(f"{fn}: cu_seqlens must be a tensor on q's device ({q.device})")
        if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"{fn}: cu_seqlens must be a 1-D int32 tensor [N+1] (flash-attn "
                             f"convention), got {cu_seqlens.dtype} of shape "
                             f"{tuple(cu_seqlens.shape)}")
        if B != 1:
            raise ValueError(f"{fn}: cu_seqlens requires batch size 1 (flatten the batch), "
                             f"got B={B}")
        n_states = cu_seqlens.numel() - 1
        if values:
            cu_list = cu_seqlens.tolist()  # the one host sync of a call with documents
            if cu_list[0] != 0 or cu_list[-1] != T:
                raise ValueError(f"{fn}: cu_seqlens must start at 0 and end at T={T}, got "
                                 f"{cu_list[0]}..{cu_list[-1]}")
            if any(b < a for a, b in zip(cu_list[:-1], cu_list[1:])):
                raise ValueError(f"{fn}: cu_seqlens must be non-decreasing")
    if initial_state is not None:
        want = (n_states, H, D, D)
        if not isinstance(initial_state, torch.Tensor) or tuple(initial_state.shape) != want:
            raise ValueError(f"{fn}: initial_state must be a tensor {list(want)} ([B or N "
                             f"documents, H, Dk, Dv]), got {getattr(initial_state, 'shape', None)}")
        if initial_state.device != q.device or not initial_state.dtype.is_floating_point:
            raise ValueError(f"{fn}: initial_state must be a floating tensor on q's device")
    if impl == "triton":
        check_triton_inputs(q, _HEAD_DIMS, f"{fn}: ")
        if K.SEG_LEN * H * D >= 2 ** 31:  # int32 row offsets inside a segment
            raise ValueError(f"{fn}: H*D={H * D} too large for the Triton kernels "
                             f"(needs SEG_LEN*H*D < 2^31)")
    return float(scale), (slopes if decay else None), cu_list


_SLOPES_OK = {}  # (data_ptr, version, device) -> fp32 slopes already validated (no sync per call)


def _checked_slopes(fn, slopes):
    key = (slopes.data_ptr(), slopes._version, str(slopes.device), slopes.dtype)
    hit = _SLOPES_OK.get(key)
    if hit is not None and hit[0] is slopes:
        return hit[1]
    s32 = slopes.detach().float()
    if not bool(torch.isfinite(s32).all()) or bool((s32 < 0).any()):
        raise ValueError(f"{fn}: slopes must be finite and >= 0 (decay exp(-slope) <= 1)")
    if len(_SLOPES_OK) > 64:
        _SLOPES_OK.clear()
    _SLOPES_OK[key] = (slopes, s32)
    return s32


_CU_OK = {}  # (data_ptr, version, device, numel, T) -> cu_seqlens already checked


def _checked_cu(cu_seqlens, T):
    """check_cu_values once per cu_seqlens tensor: every layer of a forward gets the same one,
    so a batch with documents costs one host sync, not one per layer. The cache holds the
    tensor, so its memory (and data_ptr) cannot pass to another while the entry lives."""
    if cu_seqlens is None:
        return
    key = (cu_seqlens.data_ptr(), cu_seqlens._version, str(cu_seqlens.device),
           cu_seqlens.numel(), T)
    if _CU_OK.get(key) is cu_seqlens:
        return
    check_cu_values(cu_seqlens, T)
    if len(_CU_OK) > 16:
        _CU_OK.clear()
    _CU_OK[key] = cu_seqlens


# ----------------------------------------------------------------------------- launches

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


# Feature maps the op can apply itself (scan_attn's maps=): forward, and the gradient through
# the map given its input (the op keeps the input and recomputes the map in the backward).
MAPS = ("identity", "elu1", "relu", "silu")


def apply_map(name: str, x: torch.Tensor) -> torch.Tensor:
    """The feature map `name` on x (plain torch: differentiable, traceable)."""
    if name == "identity":
        return x
    if name == "elu1":
        return F.elu(x) + 1.0
    if name == "relu":
        return F.relu(x)
    if name == "silu":
        return F.silu(x)
    raise ValueError(f"feature map {name!r} is not one of {', '.join(MAPS)}")


def _map_grad(name: str, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """g * map'(x), in x's dtype (what autograd through apply_map would give)."""
    if name == "identity":
        return g
    if name == "elu1":
        return torch.ops.aten.elu_backward(g, 1.0, 1.0, 1.0, False, x)
    if name == "relu":
        return torch.ops.aten.threshold_backward(g, x, 0)
    return torch.ops.aten.silu_backward(g, x)


def _autotune() -> bool:
    return not K.INTERPRET and os.environ.get("LINEAR_AUTOTUNE", "1") != "0"


def _dot_prec(dtype):
    # fp32 inputs get true fp32 products (as accurate as the fp32 reference, which does not use
    # TF32); 16-bit operands ignore the setting
    return "ieee" if dtype == torch.float32 else "tf32"


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
# 4 warps ~230 with small spills in the reverse variant; the autotuner picks on the GPU.
# BV = D (one DV tile) computes each score tile once; BT = 32 halves the intra-chunk work and the
# register tiles (no spills at BV = 128) but issues smaller MMAs.
_OUT_CFGS = [(64, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2), (64, 128, 8, 2), (32, 128, 8, 2),
             (32, 64, 4, 2), (64, 64, 8, 3), (128, 64, 8, 2)]
# (BA, BV, BT, warps, stages) of pass 1 (a plain decayed B^T V accumulation)
_STATE_CFGS = [(64, 64, 64, 4, 2), (64, 64, 128, 4, 3), (128, 64, 64, 8, 2),
               (128, 128, 64, 8, 2), (64, 64, 64, 4, 3), (32, 64, 64, 4, 2)]
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
    out = empty((lay.ns, H, DA, DV), torch.float32, Bm.device)
    seg_tab, _ = _seg_args(lay, Bm)
    sl = Bm if slopes is None else slopes
    common = dict(H=H, DA=DA, DV=DV, SEG=lay.seg, REVERSE=reverse, HAS_DECAY=slopes is not None,
                  VARLEN=lay.varlen, DOT_PREC=_dot_prec(Bm.dtype))
    if _autotune():
        grid = lambda m: (lay.ns * H * (DA // m["BA"]) * (DV // m["BV"]),)  # noqa: E731
        _state_tuned[grid](Bm, V, sl, out, seg_tab, T, lay.nseg, s_upd, **common)
    else:
        ba, bv, bt, w, s = _STATE_CFGS[0]
        ba, bv = min(ba, DA), min(bv, DV)
        K.seg_state_kernel[(lay.ns * H * (DA // ba) * (DV // bv),)](
            Bm, V, sl, out, seg_tab, T, lay.nseg, s_upd, BA=ba, BV=bv, BT=bt, num_warps=w,
            num_stages=s, **common)
    return out


def _scan(st, init, slopes, lay, reverse, T):
    """Pass 2 (in place on st); returns the carried value at the end ([N, H, DA, DV] fp32)."""
    _, H, DA, DV = st.shape
    final = empty((lay.n, H, DA, DV), torch.float32, st.device)
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
    o = empty(V.shape, A.dtype, A.device)
    sa, sv = (1, DA) if transposed else (DV, 1)
    seg_tab, _ = _seg_args(lay, A)
    sl = A if slopes is None else slopes
    common = dict(H=H, DA=DA, DV=DV, SEG=lay.seg, REVERSE=reverse, HAS_DECAY=slopes is not None,
                  VARLEN=lay.varlen, DOT_PREC=_dot_prec(A.dtype))
    args = (A, Bm, V, st, sa, sv, o, sl, seg_tab, T, lay.nseg, s_intra, s_inter, s_upd)
    if _autotune():
        _out_tuned[lambda m: (lay.ns * H * (DV // m["BV"]),)](*args, **common)
    else:
        bt, bv, w, s = _OUT_CFGS[0]
        bv = min(bv, DV)
        K.chunk_out_kernel[(lay.ns * H * (DV // bv),)](*args, BT=bt, BV=bv, num_warps=w,
                                                       num_stages=s, **common)
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


# ----------------------------------------------------------------------------- custom ops
# The Triton forward and backward as PyTorch custom ops: torch.compile sees one opaque op per
# attention call and compiles the model around it; eager runs go through the same ops.
#
# The backward needs the state entering every segment (st, [rows, H, D, D] fp32). The forward
# returns it as a third output, saved for the backward, rather than the backward recomputing it
# (passes 1 + 2 again: a read of k and v, about a third of the forward's HBM traffic, on every
# backward). Saving costs H*D*D*4 / seg bytes per token: 32 B per head at D = 64 and seg = 512,
# 8 B at seg = 2048, against 6*D bytes per head of q, k, v in bf16. Its row count must come from
# shapes (fake tensors under torch.compile carry no values): n_seg_rows bounds it with documents.
# The segment tables are rebuilt from cu_seqlens in the backward (a few small device ops, no
# host sync); the one sync with documents is the check of a new cu_seqlens (_checked_cu).

def _mapped(q, k, v, maps):
    qk_map, v_map = maps
    return (apply_map(qk_map, q).contiguous(), apply_map(qk_map, k).contiguous(),
            apply_map(v_map, v).contiguous())


def _slopes32(slopes):
    return None if slopes is None else slopes.detach().float().contiguous()


@torch.library.custom_op("longctx::scan_fwd", mutates_args=())
def _scan_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 initial_state: Optional[torch.Tensor], slopes: Optional[torch.Tensor],
                 scale: float, cu_seqlens: Optional[torch.Tensor], qk_map: str,
                 v_map: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o, final_state fp32, segment states st) of the maps applied to q, k, v."""
    B, T, H, _ = q.shape
    _checked_cu(cu_seqlens, T)
    if slopes is not None:
        slopes = _checked_slopes("lightning_attn", slopes)
    lay = _Layout(B, T, H, cu_seqlens, q.device)
    q, k, v = _mapped(q, k, v, (qk_map, v_map))
    return _fwd_triton(q, k, v, _slopes32(slopes), scale, initial_state, lay)


@_scan_fwd_op.register_fake
def _(q, k, v, initial_state, slopes, scale, cu_seqlens, qk_map, v_map):
    B, T, H, D = q.shape
    n_docs = None if cu_seqlens is None else cu_seqlens.shape[0] - 1
    _, rows = n_seg_rows(B, T, H, n_docs)
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty((B if n_docs is None else n_docs, H, D, D), dtype=torch.float32),
            q.new_empty((rows, H, D, D), dtype=torch.float32))


@torch.library.custom_op("longctx::scan_bwd", mutates_args=())
def _scan_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 st: torch.Tensor, slopes: Optional[torch.Tensor], scale: float,
                 cu_seqlens: Optional[torch.Tensor], d_final: Optional[torch.Tensor],
                 qk_map: str, v_map: str
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, d_initial_state fp32) given the forward's inputs and segment states."""
    B, T, H, _ = q.shape
    lay = _Layout(B, T, H, cu_seqlens, q.device)
    qm, km, vm = _mapped(q, k, v, (qk_map, v_map))
    dq, dk, dv, d_init = _bwd_triton(do.contiguous(), qm, km, vm, _slopes32(slopes), scale, st,
                                     d_final, lay)
    return (_map_grad(qk_map, dq, q), _map_grad(qk_map, dk, k), _map_grad(v_map, dv, v),
            d_init)


@_scan_bwd_op.register_fake
def _(do, q, k, v, st, slopes, scale, cu_seqlens, d_final, qk_map, v_map):
    B, _, H, D = q.shape
    n = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    return (*(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v)),
            q.new_empty((n, H, D, D), dtype=torch.float32))


def _scan_setup(ctx, inputs, output):
    q, k, v, initial_state, slopes, scale, cu_seqlens, qk_map, v_map = inputs
    ctx.set_materialize_grads(False)  # an unused final state brings None, not zeros
    ctx.save_for_backward(q, k, v, output[2], slopes, cu_seqlens)
    ctx.args = (scale, qk_map, v_map)
    ctx.init_dtype = None if initial_state is None else initial_state.dtype
    ctx.mark_non_differentiable(output[2])


def _scan_backward(ctx, do, d_final, _dst):
    q, k, v, st, slopes, cu_seqlens = ctx.saved_tensors
    scale, qk_map, v_map = ctx.args
    if do is None:
        do = torch.zeros_like(q)
    dq, dk, dv, d_init = _scan_bwd_op(do, q, k, v, st, slopes, scale, cu_seqlens, d_final,
                                      qk_map, v_map)
    d_init = None if ctx.init_dtype is None else d_init.to(ctx.init_dtype)
    return dq, dk, dv, d_init, None, None, None, None, None


_scan_fwd_op.register_autograd(_scan_backward, setup_context=_scan_setup)


class _ScanState(torch.autograd.Function):
    """Final state only: passes 1 + 2 forward (no outputs); the backward is closed-form,
    dk_t = w_t v_t dS^T, dv_t = w_t k_t dS, d initial_state = lam^L dS with w_t = lam^(L-1-t) of
    the token's document (torch matmuls in the input dtype, fp32 accumulation)."""

    @staticmethod
    def forward(ctx, k, v, initial_state, slopes, lay, cu_list):
        st = _seg_states(k, v, slopes, lay, False, 1.0)
        final = _scan(st, initial_state, slopes, lay, False, k.shape[1])
        ctx.save_for_backward(k, v, slopes)
        ctx.lay, ctx.cu_list = lay, cu_list
        ctx.init_dtype = None if initial_state is None else initial_state.dtype
        return final

    @staticmethod
    def backward(ctx, d_final):
        k, v, slopes = ctx.saved_tensors
        B, T, H, D = k.shape
        cu = ctx.cu_list or [0, T]
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        d_init = torch.empty_like(d_final)
        neg = (torch.zeros(H, device=k.device) if slopes is None else -slopes)
        for n in range(len(cu) - 1):
            s, e = cu[n], cu[n + 1]
            # without documents every batch row is one document; with them B == 1
            docs = slice(None) if ctx.cu_list is None else slice(n, n + 1)
            dS = d_final[docs]                                               # [b, H, D, D]
            dist = torch.arange(e - s - 1, -1, -1, device=k.device, dtype=torch.float32)
            w = torch.exp(neg[None, :] * dist[:, None])[None, :, :, None]    # [1, L, H, 1]
            dSc = dS.to(k.dtype)
            dk[:, s:e] = (torch.einsum("bthe,bhde->bthd", v[:, s:e], dSc).float()
                          * w).to(k.dtype)
            dv[:, s:e] = (torch.einsum("bthd,bhde->bthe", k[:, s:e], dSc).float()
                          * w).to(v.dtype)
            d_init[docs] = torch.exp(neg * (e - s))[None, :, None, None] * dS
        d_init = None if ctx.init_dtype is None else d_init.to(ctx.init_dtype)
        return dk, dv, d_init, None, None, None


# ----------------------------------------------------------------------------- public

def scan_attn(fn, q, k, v, slopes, scale, initial_state, output_final_state, cu_seqlens, *,
              decay: bool, maps=("identity", "identity")):
    """The public ops' body (fn names the caller in error messages; decay: the family has
    slopes). maps = (map of q and k, map of v), applied to the inputs first (see MAPS)."""
    impl = _impl(q) if isinstance(q, torch.Tensor) else "ref"
    values = impl == "ref" and not torch.compiler.is_compiling()
    scale, slopes, _ = _check(fn, q, k, v, slopes, scale, initial_state, cu_seqlens, impl,
                              decay, values=values)
    for m in maps:
        if m not in MAPS:
            raise ValueError(f"{fn}: feature map {m!r} is not one of {', '.join(MAPS)}")
    if impl == "ref":
        q, k, v = apply_map(maps[0], q), apply_map(maps[0], k), apply_map(maps[1], v)
        # under torch.compile the form without host values, so the block stays one graph
        form = R.masked if torch.compiler.is_compiling() else R.chunked
        o, final = form(q, k, v, slopes, scale=scale, initial_state=initial_state,
                        cu_seqlens=cu_seqlens)
    else:
        o, final, _ = _scan_fwd_op(q, k, v, initial_state, slopes, scale, cu_seqlens, *maps)
    return o, (final if output_final_state else None)


def scan_fwd(fn, q, k, v, slopes, initial_state, scale, cu_seqlens, *, decay: bool):
    """(o, final_state) without autograd (Triton, or the reference under ATTN_IMPL=ref/CPU)."""
    impl = _impl(q)
    scale, slopes, _ = _check(fn, q, k, v, slopes, scale, initial_state, cu_seqlens, impl,
                              decay)
    with torch.no_grad():
        if impl == "ref":
            return R.chunked(q, k, v, slopes, scale=scale, initial_state=initial_state,
                             cu_seqlens=cu_seqlens)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        lay = _Layout(q.shape[0], q.shape[1], q.shape[2], cu_seqlens, q.device)
        o, final, _ = _fwd_triton(q, k, v, slopes, scale, initial_state, lay)
        return o, final


def scan_bwd(fn, do, q, k, v, slopes, initial_state, d_final_state, scale, cu_seqlens, *,
             decay: bool):
    """(dq, dk, dv, d_initial_state); the segment states are recomputed from initial_state."""
    impl = _impl(q)
    scale, slopes, _ = _check(fn, q, k, v, slopes, scale, initial_state, cu_seqlens, impl,
                              decay)
    if do is None or do.shape != q.shape:
        raise ValueError(f"{fn}: do must have q's shape {tuple(q.shape)}")
    n_states = q.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
    want = (n_states, q.shape[2], q.shape[3], q.shape[3])
    if d_final_state is not None and tuple(d_final_state.shape) != want:
        raise ValueError(f"{fn}: d_final_state must be [{n_states}, H, D, D] like the final state")
    if impl == "ref":
        with torch.enable_grad():
            xs = [t.detach().requires_grad_() for t in (q, k, v)]
            init = (torch.zeros(n_states, q.shape[2], q.shape[3], q.shape[3], device=q.device,
                                dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
                    if initial_state is None else initial_state.detach().clone())
            init.requires_grad_()
            o, final = R.chunked(*xs, slopes, scale=scale, initial_state=init,
                                 cu_seqlens=cu_seqlens)
            outs, grads = [o], [do]
            if d_final_state is not None:
                outs.append(final)
                grads.append(d_final_state.to(final.dtype))
            g = torch.autograd.grad(outs, [*xs, init], grads, allow_unused=True)
        return tuple(g)
    q, k, v, do = q.contiguous(), k.contiguous(), v.contiguous(), do.contiguous()
    lay = _Layout(q.shape[0], q.shape[1], q.shape[2], cu_seqlens, q.device)
    with torch.no_grad():
        T = q.shape[1]
        st = _seg_states(k, v, slopes, lay, False, 1.0)
        _scan(st, initial_state, slopes, lay, False, T)
        return _bwd_triton(do, q, k, v, slopes, scale, st, d_final_state, lay)


@torch.compiler.disable
def scan_state(fn, k, v, slopes, initial_state, cu_seqlens, *, decay: bool):
    """The final state alone, differentiable (LASP's first pass needs no outputs)."""
    impl = _impl(k) if isinstance(k, torch.Tensor) else "ref"
    _, slopes, cu_list = _check(fn, k, k, v, slopes, None, initial_state, cu_seqlens, impl,
                                decay)
    if impl == "ref":
        return R.final_state(k, v, slopes, initial_state=initial_state, cu_seqlens=cu_seqlens)
    k, v = k.contiguous(), v.contiguous()
    lay = _Layout(k.shape[0], k.shape[1], k.shape[2], cu_seqlens, k.device)
    return _ScanState.apply(k, v, initial_state, slopes, lay, cu_list)


def linear_state(k, v, *, initial_state=None, cu_seqlens=None):
    """Final state [B or N, H, Dk, Dv] fp32 of linear_attn without computing the outputs."""
    return scan_state("linear_state", k, v, None, initial_state, cu_seqlens, decay=False)


def linear_attn(q, k, v, *, scale=None, initial_state=None, output_final_state=False,
                cu_seqlens=None):
    """Causal linear attention o_t = scale * q_t S_t, S_t = S_{t-1} + k_t^T v_t (no feature map:
    the layer applies it). Returns (o, final_state or None); see the module docstring."""
    return scan_attn("linear_attn", q, k, v, None, scale, initial_state, output_final_state,
                     cu_seqlens, decay=False)


def linear_fwd(q, k, v, initial_state=None, *, scale=None, cu_seqlens=None):
    """CP primitive: (o, final_state fp32), no autograd."""
    return scan_fwd("linear_fwd", q, k, v, None, initial_state, scale, cu_seqlens, decay=False)


def linear_bwd(do, q, k, v, initial_state=None, d_final_state=None, *, scale=None,
               cu_seqlens=None):
    """CP primitive: (dq, dk, dv, d_initial_state) of linear_fwd given do and d final_state."""
    return scan_bwd("linear_bwd", do, q, k, v, None, initial_state, d_final_state, scale,
                    cu_seqlens, decay=False)


fwd, bwd = linear_fwd, linear_bwd
