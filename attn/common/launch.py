"""Host-side launch options every family's launchers share: the dot precision, register caps,
per-head-dim config tables and the TMA decision."""
from __future__ import annotations

import functools
import os

import torch
import triton

from attn.dispatch import INTERPRET


def dot_precision(dtype: torch.dtype) -> str:
    """input_precision of tl.dot: fp32 inputs get true fp32 products (the contract: as accurate
    as the fp32 reference); 16-bit inputs ignore the setting."""
    return "ieee" if dtype == torch.float32 else "tf32"


def reg_cap(maxnreg):
    """Launch options capping a kernel's registers per thread (None: the compiler's choice;
    the interpreter takes no such option)."""
    return {} if INTERPRET or maxnreg is None else {"maxnreg": maxnreg}


def pick_dim(table, d, dtype):
    """The table entry for head dim d: the smallest listed head dim >= d; fp32 tiles take twice
    the bytes of 16-bit ones, so fp32 uses the entry of 2*d (512: fp32 at D = 256)."""
    d = d * 2 if dtype == torch.float32 else d
    return min(k for k in table if k >= d)


# TMA tensor descriptors (Hopper+, and the interpreter) per kernel kind: "dkdv" for the row tiles
# a dK/dV kernel streams (Q, dO), "dq" for those a dQ or forward kernel streams (K, V).
# FLASH_TMA=0 keeps pointer loads in every family's kernels; measurements: docs/flash_notes.md.
TMA = {kind: os.environ.get("FLASH_TMA", "1") != "0" for kind in ("dkdv", "dq")}


def use_tma(kind: str, *tensors) -> bool:
    """Whether `kind`'s kernel loads its streamed tiles through TMA descriptors: enabled for the
    kind, a Hopper-or-newer GPU (or the interpreter), 16-byte aligned bases (the descriptor's
    rule; row strides H·D·size are multiples of 16 for every supported head dim)."""
    if not TMA.get(kind, False):
        return False
    dev = tensors[0].device
    if not INTERPRET and (dev.type != "cuda" or device_capability(dev.index)[0] < 9):
        return False
    if any(t.data_ptr() % 16 for t in tensors):
        return False
    # device-side descriptors (tl.make_tensor_descriptor) need scratch memory per launch; the
    # allocator is a context variable, so it is set in the calling thread every time (autograd
    # runs the backward in its own thread)
    triton.set_allocator(_scratch)
    return True


@functools.lru_cache(maxsize=None)
def device_capability(index: int):
    """(major, minor) of CUDA device `index`, asked once per device (the launch paths ask on
    every call; torch asks the driver's device properties each time)."""
    return torch.cuda.get_device_capability(index)


def _scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cpu" if INTERPRET else "cuda")
