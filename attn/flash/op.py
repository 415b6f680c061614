"""Public op: argument checks, implementation dispatch, the CP primitives and the autograd op.

    flash_fwd(q, k, v, *, scale, causal, cu_seqlens, q_offset, window) -> (o, lse)
    flash_bwd(do, q, k, v, o, lse, *, scale, causal, cu_seqlens, q_offset, window) -> (dq, dk, dv)
    flash_attn(q, k, v, *, scale, cu_seqlens, q_offset, window, return_lse) -> o | (o, lse)

Layout [B, T, H, D] contiguous; causal with absolute positions (query i at q_offset + i, keys at
0..Tk-1, Tk >= q_offset + Tq); cu_seqlens (int32 [N+1], B == 1) describes the KEY sequence;
window w keeps keys t-w < s <= t. lse: natural log, fp32, [B, Hq, Tq].
The primitives also take causal=False (ring attention's off-diagonal blocks: every query sees
every key; then no documents, window or q_offset), and copy non-contiguous inputs (ring passes
slices); flash_attn is always causal and rejects non-contiguous inputs.
Implementation: Triton on CUDA tensors, ref.py on CPU tensors; ATTN_IMPL=triton|ref forces one
(TRITON_INTERPRET=1 with ATTN_IMPL=triton runs the kernels on CPU tensors). The forward on Hopper
is the Gluon kernel (fwd_gluon.py) for the inputs in its scope (16-bit, D 64 / 128), fwd.py
otherwise; FLASH_FWD_IMPL=triton | gluon forces one (gluon: an error outside its scope).
"""
from __future__ import annotations

from typing import Optional

import torch

from attn.common.checks import check_bwd_buffers, check_cu_values, check_qkv
from attn.common.customop import autograd_op_or_body, op_or_body
from attn.common.documents import key_doc_bounds
from attn.dispatch import impl_for
from attn.flash import common
from attn.flash.ref import flash_attn_ref, flash_bwd_ref

_HEAD_DIMS = (16, 32, 64, 128, 256)


_impl = impl_for  # see attn/dispatch.py


def _check(fn, q, k, v, scale, cu_seqlens, q_offset, window, impl, causal=True):
    """Validate the contract; return the scale as a float (raises ValueError naming the rule)."""
    if not causal and (cu_seqlens is not None or window is not None or q_offset != 0):
        raise ValueError(f"{fn}: causal=False (every query sees every key) takes no cu_seqlens, "
                         f"window or q_offset, got cu_seqlens="
                         f"{'set' if cu_seqlens is not None else None}, window={window}, "
                         f"q_offset={q_offset}")
    # (T·H·D may pass 2^31: the kernels offset rows in int64)
    check_qkv(fn, q, k, v, q_offset=q_offset if causal else None, window=window,
              cu_seqlens=cu_seqlens, head_dims=_HEAD_DIMS if impl == "triton" else None,
              contiguous=impl == "triton")
    return float(q.shape[3] ** -0.5 if scale is None else scale)


def _kernel_offset(causal, q_offset, tk):
    # non-causal = causal with every query at or past the last key (the kernels clamp to Tk)
    return q_offset if causal else tk - 1


def flash_fwd(q, k, v, *, scale=None, causal: bool = True, cu_seqlens=None, q_offset: int = 0,
              window=None):
    """Forward primitive (no autograd): (o [B, Tq, Hq, D] q.dtype, lse [B, Hq, Tq] fp32)."""
    impl = _impl(q)
    q, k, v = (t.contiguous() if isinstance(t, torch.Tensor) else t for t in (q, k, v))
    scale = _check("flash_fwd", q, k, v, scale, cu_seqlens, q_offset, window, impl, causal)
    if impl == "ref":
        with torch.no_grad():
            return flash_attn_ref(q, k, v, scale=scale, cu_seqlens=cu_seqlens,
                                  q_offset=q_offset, window=window, causal=causal)
    seg = key_doc_bounds(cu_seqlens, k.shape[1])
    return fwd_kernel(q, k, v, scale, None if seg is None else seg[0],
                       _kernel_offset(causal, q_offset, k.shape[1]), window)


def _gluon_scope_error(q, k):
    """Why the Gluon forward cannot take (q, k) on a Hopper GPU, or None (imported only there)."""
    from attn.flash.fwd_gluon import scope_error
    return scope_error(q, k)


def fwd_kernel(q, k, v, scale, seg_start, q_offset, window):
    """The forward kernel FLASH_FWD_IMPL selects (common.FWD_IMPL), on checked inputs."""
    if common.gluon_chosen("FLASH_FWD_IMPL", common.FWD_IMPL, q, "Gluon flash forward",
                           lambda: _gluon_scope_error(q, k)):
        from attn.flash.fwd_gluon import fwd_gluon
        return fwd_gluon(q, k, v, scale, seg_start, q_offset, window)
    from attn.flash.fwd import fwd_triton
    return fwd_triton(q, k, v, scale, seg_start, q_offset, window)


def flash_bwd(do, q, k, v, o, lse, *, scale=None, causal: bool = True, cu_seqlens=None,
              q_offset: int = 0, window=None, delta=None, dq=None):
    """Backward primitive: (dq, dk, dv) shaped like q, k, v, given dO and the forward's o, lse.
    Triton path only: delta = rowsum(o·do) fp32 [B, Hq, Tq] if the caller has it (else computed
    here); dq, a contiguous tensor like q that this dQ is added to (returned)."""
    impl = _impl(q)
    q, k, v = (t.contiguous() if isinstance(t, torch.Tensor) else t for t in (q, k, v))
    scale = _check("flash_bwd", q, k, v, scale, cu_seqlens, q_offset, window, impl, causal)
    if do.shape != q.shape or o.shape != q.shape:
        raise ValueError(f"flash_bwd: do {tuple(do.shape)} and o {tuple(o.shape)} must have q's "
                         f"shape {tuple(q.shape)}")
    B, tq, hq, _ = q.shape
    if lse.shape != (B, hq, tq):
        raise ValueError(f"flash_bwd: lse must be [B, Hq, Tq] = {(B, hq, tq)}, got "
                         f"{tuple(lse.shape)}")
    if impl == "ref":  # uses the given o, lse: ring attention passes the merged ones
        if delta is not None or dq is not None:
            raise ValueError("flash_bwd: delta= and dq= are Triton-path options (CUDA tensors)")
        return flash_bwd_ref(do, q, k, v, o, lse, scale=scale, cu_seqlens=cu_seqlens,
                             q_offset=q_offset, window=window, causal=causal)
    if lse.dtype != torch.float32 or do.dtype != q.dtype or o.dtype != q.dtype:
        raise ValueError(f"flash_bwd: lse must be float32 and do, o in q's dtype {q.dtype}, got "
                         f"lse {lse.dtype}, do {do.dtype}, o {o.dtype}")
    check_bwd_buffers(q, delta, dq, "flash_bwd: ")
    return _bwd(do, q, k, v, o, lse, scale, key_doc_bounds(cu_seqlens, k.shape[1]),
                _kernel_offset(causal, q_offset, k.shape[1]), window, delta, dq)


FP8_MAX = 448.0  # largest finite float8_e4m3fn


def quantize_fp8(x: torch.Tensor):
    """(x8, scale): float8_e4m3fn values, fp32 scales per (batch, token, head); x ~ x8 * scale."""
    amax = x.abs().amax(dim=-1).float().clamp_min(1e-12)
    s = amax / FP8_MAX
    return (x.float() / s[..., None]).to(torch.float8_e4m3fn), s.contiguous()


def flash_fwd_fp8(q, k, v, *, scale=None, cu_seqlens=None, q_offset: int = 0, window=None):
    """Forward primitive with Q K^T in FP8 (e4m3 operands, fp32 scale per token and head, fp32
    accumulation); softmax, P V and the output stay in v's dtype (bf16/fp16). No backward:
    an inference / evaluation option. Needs CUDA (sm_89+). Returns (o, lse) like flash_fwd."""
    if not q.is_cuda:
        raise ValueError(f"flash_fwd_fp8: needs CUDA tensors (FP8 tensor cores), q is on "
                         f"{q.device}")
    scale = _check("flash_fwd_fp8", q, k, v, scale, cu_seqlens, q_offset, window, "triton")
    if q.dtype == torch.float32:
        raise ValueError("flash_fwd_fp8: q, k, v must be bfloat16 or float16")
    from attn.flash.fwd import fwd_triton
    q8, qs = quantize_fp8(q)
    k8, ks = quantize_fp8(k)
    seg = key_doc_bounds(cu_seqlens, k.shape[1])
    return fwd_triton(q8, k8, v, scale, None if seg is None else seg[0], q_offset, window,
                      q_scale=qs, k_scale=ks)


def _bwd(do, q, k, v, o, lse, scale, seg, q_offset, window, delta=None, dq=None):
    from attn.flash.bwd import bwd_triton
    return bwd_triton(do.contiguous(), q, k, v, o.contiguous(), lse.contiguous(), scale, seg,
                      q_offset, window, delta, dq)


# The Triton forward and backward as PyTorch custom ops: torch.compile sees one opaque op per
# attention call (fake implementations give the output shapes) and compiles the model around it;
# eager calls run the same bodies without the dispatcher (attn/common/customop.py), so eager and
# compiled runs launch the same kernels. The document arrays are rebuilt from cu_seqlens in the
# backward (one searchsorted, no host sync).
def _flash_fwd_body(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  cu_seqlens: Optional[torch.Tensor], q_offset: int,
                  window: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    check_cu_values(cu_seqlens, k.shape[1])
    seg = key_doc_bounds(cu_seqlens, k.shape[1])
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return fwd_kernel(q, k, v, scale, None if seg is None else seg[0], q_offset, window)


_flash_fwd_op = torch.library.custom_op("longctx::flash_fwd", mutates_args=())(_flash_fwd_body)


@_flash_fwd_op.register_fake
def _(q, k, v, scale, cu_seqlens, q_offset, window):
    B, tq, hq, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        q.new_empty((B, hq, tq), dtype=torch.float32)


def _flash_bwd_body(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  o: torch.Tensor, lse: torch.Tensor, scale: float,
                  cu_seqlens: Optional[torch.Tensor], q_offset: int, window: Optional[int],
                  dlse: Optional[torch.Tensor] = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    seg = key_doc_bounds(cu_seqlens, k.shape[1])
    delta = None
    if dlse is not None:
        # lse = log sum_j exp(s_j) adds dlse * p_j to dS_j, and dS = P * (dP - delta): the
        # gradient through lse is delta lowered by dlse, the kernels unchanged
        from attn.common.softmax import bwd_delta
        delta = bwd_delta(o.contiguous(), do.contiguous()) - dlse.float()
    return _bwd(do, q, k, v, o, lse, scale, seg, q_offset, window, delta=delta)


_flash_bwd_op = torch.library.custom_op("longctx::flash_bwd", mutates_args=())(_flash_bwd_body)
_flash_bwd = op_or_body(_flash_bwd_op, _flash_bwd_body)


@_flash_bwd_op.register_fake
def _(do, q, k, v, o, lse, scale, cu_seqlens, q_offset, window, dlse=None):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _flash_setup(ctx, inputs, output):
    q, k, v, scale, cu_seqlens, q_offset, window = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, cu_seqlens)
    ctx.args = (scale, q_offset, window)
    ctx.set_materialize_grads(False)  # an unused lse (the common case) brings no dlse


def _flash_backward(ctx, do, dlse):
    q, k, v, o, lse, cu_seqlens = ctx.saved_tensors
    scale, q_offset, window = ctx.args
    if do is None:  # only lse was used
        do = torch.zeros_like(o)
    dq, dk, dv = _flash_bwd(do, q, k, v, o, lse, scale, cu_seqlens, q_offset, window, dlse)
    return dq, dk, dv, None, None, None, None


_flash_fwd_op.register_autograd(_flash_backward, setup_context=_flash_setup)
_flash_fwd = autograd_op_or_body(_flash_fwd_op, _flash_fwd_body, _flash_setup, _flash_backward)


def flash_attn(q, k, v, *, scale=None, cu_seqlens=None, q_offset: int = 0, window=None,
               return_lse: bool = False):
    """Causal softmax attention ([B, T, H, D]); returns o, or (o, lse) with return_lse. lse is
    differentiable (as FlexAttention's): attention outputs can be merged by their lse and
    trained through."""
    impl = _impl(q)
    scale = _check("flash_attn", q, k, v, scale, cu_seqlens, q_offset, window, impl)
    if impl == "ref":
        o, lse = flash_attn_ref(q, k, v, scale=scale, cu_seqlens=cu_seqlens, q_offset=q_offset,
                                window=window)
    else:
        o, lse = _flash_fwd(q, k, v, scale, cu_seqlens, q_offset, window)
    return (o, lse) if return_lse else o
