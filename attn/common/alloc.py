"""The allocator of every kernel output, looked up at call time (`alloc.empty(...)`): tests swap
it for a NaN-filled one, so an element a kernel forgets to write shows up as NaN."""
from __future__ import annotations

import torch


def empty(shape, dtype, device):
    """torch.empty; the one place every family's launchers allocate their outputs."""
    return torch.empty(shape, dtype=dtype, device=device)
