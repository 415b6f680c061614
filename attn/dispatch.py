"""Which implementation runs an op: Triton kernels or the family's ref.py.

Triton on CUDA tensors, ref.py on CPU tensors; `ATTN_IMPL=triton|ref` forces one. With
`TRITON_INTERPRET=1` (set before the kernels are imported) `ATTN_IMPL=triton` runs the kernels
on CPU tensors: that is how the tests exercise them without a GPU.
"""
from __future__ import annotations

import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def impl_for(x: torch.Tensor) -> str:
    """'triton' or 'ref' for an op whose main input is `x`."""
    forced = os.environ.get("ATTN_IMPL", "").strip().lower()
    if forced not in ("", "triton", "ref"):
        raise ValueError(f"ATTN_IMPL={forced!r}: must be 'triton' or 'ref' (or unset)")
    is_cuda = getattr(x, "is_cuda", False)
    impl = forced or ("triton" if is_cuda else "ref")
    if impl == "triton" and not is_cuda and not INTERPRET:
        raise ValueError("ATTN_IMPL=triton needs CUDA tensors (or TRITON_INTERPRET=1 set before "
                         f"import to run the kernels on CPU); the input is on "
                         f"{getattr(x, 'device', type(x))}")
    return impl

