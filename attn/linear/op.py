"""Public ops of the linear-attention families: checks, dispatch, CP primitives, autograd.

    linear_attn(q, k, v, *, scale=None, initial_state=None, output_final_state=False,
                cu_seqlens=None) -> (o, final_state | None)
    linear_fwd(q, k, v, initial_state=None, *, scale=None, cu_seqlens=None) -> (o, final_state)
    linear_bwd(do, q, k, v, initial_state=None, d_final_state=None, *, scale=None,
               cu_seqlens=None) -> (dq, dk, dv, d_initial_state)
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
Implementation: Triton (kernels.py, launched by launch.py) on CUDA tensors, ref.chunked on CPU
tensors; ATTN_IMPL=triton|ref forces one (TRITON_INTERPRET=1 with ATTN_IMPL=triton runs the
kernels on CPU).
The Triton forward and backward of `scan_attn` are the custom ops longctx::scan_fwd /
longctx::scan_bwd: torch.compile sees one opaque op per call and can compile the model around
it with fullgraph=True (the primitives below stay eager).
`scan_attn(..., maps=(qk_map, v_map))` (the layer cores' path) applies the feature maps inside
the op: it saves the maps' inputs and recomputes the maps in the backward, so the mapped q, k, v
and the maps' inputs are not both kept alive.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from attn.common.checks import check_cu_values, check_qkv, cu_seqlens_list
from attn.common.customop import autograd_op_or_body, op_or_body
from attn.dispatch import impl_for
from attn.linear import kernels as K
from attn.linear import ref as R
from attn.linear.launch import _bwd_triton, _fwd_triton, _Layout, _scan, _seg_states, n_seg_rows

_HEAD_DIMS = (16, 32, 64, 128, 256)  # powers of two: tl.arange / tl.dot tile sizes


_impl = impl_for  # see attn/dispatch.py


# ----------------------------------------------------------------------------- checks

def _check(fn, q, k, v, slopes, scale, initial_state, cu_seqlens, impl, decay: bool,
           values: bool = True):
    """Validate the contract (ValueError naming the argument); return (scale as a float,
    slopes (fp32 when checked) or None, cu_seqlens as a host list or None). values=False skips
    the checks that read tensor values (slopes >= 0, cu_seqlens' boundaries; they sync with the
    device and cannot run while torch.compile traces): the custom op checks them when it runs."""
    check_qkv(fn, q, k, v, one_head_count=True, cu_seqlens=cu_seqlens, cu_values=False,
              head_dims=_HEAD_DIMS if impl == "triton" else None)
    B, T, H, D = q.shape
    if min(B, T, H, D) < 1:
        raise ValueError(f"{fn}: q {tuple(q.shape)}: B, T, H and D must all be >= 1")
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
        n_states = cu_seqlens.numel() - 1
        if values:  # the one host sync of a call with documents
            cu_list = cu_seqlens_list(cu_seqlens, T, f"{fn}: ")
    if initial_state is not None:
        want = (n_states, H, D, D)
        if not isinstance(initial_state, torch.Tensor) or tuple(initial_state.shape) != want:
            raise ValueError(f"{fn}: initial_state must be a tensor {list(want)} ([B or N "
                             f"documents, H, Dk, Dv]), got {getattr(initial_state, 'shape', None)}")
        if initial_state.device != q.device or not initial_state.dtype.is_floating_point:
            raise ValueError(f"{fn}: initial_state must be a floating tensor on q's device")
    if impl == "triton" and K.SEG_LEN * H * D >= 2 ** 31:  # int32 row offsets inside a segment
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


# ----------------------------------------------------------------------------- feature maps

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


# ----------------------------------------------------------------------------- custom ops
# The Triton forward and backward as PyTorch custom ops: torch.compile sees one opaque op per
# attention call and compiles the model around it; eager calls run the same bodies without the
# dispatcher (attn/common/customop.py).
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


def _scan_fwd_body(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
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


_scan_fwd_op = torch.library.custom_op("longctx::scan_fwd", mutates_args=())(_scan_fwd_body)


@_scan_fwd_op.register_fake
def _(q, k, v, initial_state, slopes, scale, cu_seqlens, qk_map, v_map):
    B, T, H, D = q.shape
    n_docs = None if cu_seqlens is None else cu_seqlens.shape[0] - 1
    _, rows = n_seg_rows(B, T, H, n_docs)
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty((B if n_docs is None else n_docs, H, D, D), dtype=torch.float32),
            q.new_empty((rows, H, D, D), dtype=torch.float32))


def _scan_bwd_body(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
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


_scan_bwd_op = torch.library.custom_op("longctx::scan_bwd", mutates_args=())(_scan_bwd_body)
_scan_bwd = op_or_body(_scan_bwd_op, _scan_bwd_body)


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
    dq, dk, dv, d_init = _scan_bwd(do, q, k, v, st, slopes, scale, cu_seqlens, d_final, qk_map,
                                   v_map)
    d_init = None if ctx.init_dtype is None else d_init.to(ctx.init_dtype)
    return dq, dk, dv, d_init, None, None, None, None, None


_scan_fwd_op.register_autograd(_scan_backward, setup_context=_scan_setup)
_scan_fwd = autograd_op_or_body(_scan_fwd_op, _scan_fwd_body, _scan_setup, _scan_backward)



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
        o, final, _ = _scan_fwd(q, k, v, initial_state, slopes, scale, cu_seqlens, *maps)
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
