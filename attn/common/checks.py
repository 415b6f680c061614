"""Argument validation shared by every family's op: each rule raises a ValueError that names the
argument and the rule, prefixed with the calling function (`where`, e.g. "flash_attn: ").

check_qkv holds the rules on q, k, v [B, T, H, D] every family shares (shapes, GQA, dtype,
device, q_offset, window, cu_seqlens, the Triton path's dtype / head dim / device and layout);
the family-specific rules stay in each family's op. Value rules on cu_seqlens read the tensor
(one host sync): check_cu_seqlens skips them while torch.compile traces, and the custom ops
check them when they run (check_cu_values).
"""
from __future__ import annotations

import torch

from attn import dispatch

TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_qkv(fn: str, q, k, v, *, names=("q", "k", "v"), one_head_count: bool = False,
              max_group=None, q_offset=None, window=None, cu_seqlens=None,
              cu_values: bool = True, head_dims=None, contiguous: bool = False) -> None:
    """The shared rules on q [B, Tq, Hq, D] and k, v [B, Tk, Hkv, D]; messages start "fn: ".

    names: what the messages call the three tensors. one_head_count: Hq == Hkv and Tq == Tk
    (linear attention); else GQA, Hq a multiple of Hkv (at most max_group query heads per KV
    head when given). q_offset (None: not checked): the queries sit at absolute positions
    q_offset.. of the Tk keys. window (None: not checked): an int >= 1. cu_seqlens: document
    boundaries of the key sequence (B == 1); cu_values=False leaves its value rules to the
    caller. head_dims: the Triton path (check_triton_inputs); contiguous: q, k, v contiguous."""
    where = f"{fn}: "
    nq, nk, nv = names
    for name, t in zip(names, (q, k, v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{where}{name} must be a 4-D tensor [B, T, H, D], got "
                             f"{getattr(t, 'shape', type(t))}")
    layout = f"expected {nq} [B, Tq, Hq, D] and {nk}, {nv} [B, Tk, Hkv, D]"
    if k.shape != v.shape:
        raise ValueError(f"{where}{nk} {tuple(k.shape)} and {nv} {tuple(v.shape)} must have the "
                         f"same shape: {layout}")
    B, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    if k.shape[0] != B or k.shape[3] != d:
        raise ValueError(f"{where}{nq} {tuple(q.shape)} and {nk} {tuple(k.shape)} must agree on "
                         f"batch (dim 0) and head dim (dim 3): {layout}")
    if one_head_count:
        if hq != hkv:
            raise ValueError(f"{where}{nq} has {hq} heads and {nk}/{nv} {hkv}: one head count "
                             f"needed (repeat {nk}/{nv} heads for GQA)")
        if tq != tk:
            raise ValueError(f"{where}{nq} {tuple(q.shape)} and {nk} {tuple(k.shape)} must have "
                             "the same shape [B, T, H, D]")
    elif hkv == 0 or hq % hkv or (max_group is not None and hq // hkv > max_group):
        group = "" if max_group is None else f" with group size Hq/Hkv <= {max_group}"
        raise ValueError(f"{where}GQA: Hq={hq} ({nq} dim 2) must be a multiple of Hkv={hkv} "
                         f"({nk} dim 2){group}")
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise ValueError(f"{where}{nq}, {nk}, {nv} must share one dtype (one floating dtype), "
                         f"got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{where}{nq}, {nk}, {nv} must be on one device, got {q.device}, "
                         f"{k.device}, {v.device}")
    if q_offset is not None and (not isinstance(q_offset, int) or q_offset < 0
                                 or q_offset + tq > tk):
        raise ValueError(f"{where}q_offset={q_offset!r} must be an int with 0 <= q_offset and "
                         f"q_offset + Tq <= Tk (Tq={tq}, Tk={tk})")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"{where}window={window!r} must be None or an int >= 1")
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.device != q.device:
            raise ValueError(f"{where}cu_seqlens must be a tensor on {nq}'s device ({q.device})")
        check_cu_seqlens(cu_seqlens, B, tk, where, values=cu_values)
    if head_dims is not None:
        check_triton_inputs(q, head_dims, where)
    if contiguous:
        for name, t in zip(names, (q, k, v)):
            if not t.is_contiguous():
                raise ValueError(f"{where}{name} must be contiguous in the [B, T, H, D] layout "
                                 f"(strides {t.stride()}); call .contiguous() first")


def check_triton_inputs(q: torch.Tensor, head_dims: tuple, where: str = "") -> None:
    """The Triton kernels' rules: dtype, head dim, and a CUDA tensor (or the interpreter)."""
    if q.dtype not in TRITON_DTYPES:
        raise ValueError(f"{where}dtype {q.dtype} is not supported by the Triton kernels: use "
                         "bfloat16, float16 or float32 (or ATTN_IMPL=ref)")
    if q.shape[-1] not in head_dims:
        raise ValueError(f"{where}head dim D={q.shape[-1]} is not supported by the Triton "
                         f"kernels: D must be one of {head_dims}")
    if not q.is_cuda and not dispatch.INTERPRET:
        raise ValueError(f"{where}the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set "
                         f"before import), got {q.device}")


def check_cu_seqlens(cu_seqlens: torch.Tensor, batch: int, total: int, where: str = "",
                     values: bool = True) -> None:
    """The layout rules; the value rules too (values=True) except while torch.compile traces
    (they read the tensor: the custom ops check them when they run, see check_cu_values)."""
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{where}cu_seqlens must be a 1-D int32 tensor [N+1] (flash-attn "
                         f"convention), got {cu_seqlens.dtype} of shape "
                         f"{tuple(cu_seqlens.shape)}")
    if batch != 1:
        raise ValueError(f"{where}cu_seqlens requires batch size 1 (flatten the batch), got "
                         f"B={batch}")
    if values and not torch.compiler.is_compiling():
        check_cu_values(cu_seqlens, total, where)


def check_cu_values(cu_seqlens: torch.Tensor | None, total: int, where: str = "") -> None:
    """cu_seqlens starts at 0, ends at `total` and never decreases (one host sync)."""
    if cu_seqlens is None:
        return
    first, last, bad = torch.stack([cu_seqlens[0], cu_seqlens[-1],
                                    (cu_seqlens[1:] < cu_seqlens[:-1]).any().int()]).tolist()
    _check_cu_bounds(first, last, bool(bad), total, where)


def cu_seqlens_list(cu_seqlens: torch.Tensor, total: int, where: str = "") -> list:
    """cu_seqlens as a host list (one host sync), checked by check_cu_values' rules."""
    cu = cu_seqlens.tolist()
    _check_cu_bounds(cu[0], cu[-1], any(b < a for a, b in zip(cu[:-1], cu[1:])), total, where)
    return cu


def _check_cu_bounds(first: int, last: int, decreasing: bool, total: int, where: str) -> None:
    if first != 0 or last != total:
        raise ValueError(f"{where}cu_seqlens must start at 0 and end at T={total}, got "
                         f"{first}..{last}")
    if decreasing:
        raise ValueError(f"{where}cu_seqlens must be non-decreasing")


def check_bwd_buffers(q, delta, dq, where: str = "") -> None:
    """The optional buffers of a backward primitive: delta = rowsum(o·do), fp32 [B, Hq, Tq], and
    dq, a tensor like q to add into; each None or contiguous on q's device."""
    B, tq, hq = q.shape[:3]
    for name, t, want in (("delta", delta, ((B, hq, tq), torch.float32)),
                          ("dq", dq, (q.shape, q.dtype))):
        if t is not None and ((t.shape, t.dtype) != want or not t.is_contiguous()
                              or t.device != q.device):
            raise ValueError(f"{where}{name} must be a contiguous {want[1]} tensor "
                             f"{tuple(want[0])} on {q.device}, got {t.dtype} {tuple(t.shape)} "
                             f"on {t.device}")
