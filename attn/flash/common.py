"""Pieces shared by the forward and backward kernels: constants, the row bounds of the mask,
document arrays, configs and the output allocator.

Masking, in one sentence: query row i sits at absolute position p = q_offset + i and may see key
s when  lo(p) <= s <= p,  where lo(p) = max(doc_start(p), p - window + 1) (each term only when
documents / a window are given). lo is non-decreasing in p, so a query block's visible keys are
[lo(first row), last row] and the keys visible to *every* row are [lo(last row), first row]; the
kernels loop over key blocks in three ranges: masked / unmasked (all pairs visible) / masked,
and skip every other block. The backward dK/dV kernel does the same over query blocks with the
per-key upper bound hi(s) = min(doc_end(s), s + window - 1).

Index arithmetic (every family's kernels): T·H·D passes 2^31 at long contexts (2^21 tokens x 8
heads x 128), so element offsets are formed as an int64 base (batch, the tile's first row or the
chunk's first key, times the row stride) plus int32 offsets inside the tile (BLOCK·H·D, small);
gathered rows take an int64 row offset each. Positions, row and block indices stay int32 (every
tensor has fewer than 2^31 rows: B·T·H·D elements of at least 2 bytes with H·D >= 16 would not
fit a GPU), so loops and masks keep 32-bit arithmetic.
"""
from __future__ import annotations

import functools
import os
import warnings

import torch
import triton
import triton.language as tl

# set before any kernel is defined: the interpreter runs the kernels on CPU tensors (tests)
from attn.dispatch import INTERPRET  # noqa: E402

LOG2E_F = 1.4426950408889634  # log2(e): exp(x) = exp2(x * LOG2E)
LN2_F = 0.6931471805599453  # ln(2): natural-log lse = log2-domain lse * LN2
LOG2E = tl.constexpr(LOG2E_F)  # the same, usable inside kernels
LN2 = tl.constexpr(LN2_F)


def empty(shape, dtype, device):
    """Allocator of every kernel output (tests swap it for a NaN-filled one: unwritten elements
    then show up as NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def check_bwd_buffers(q, delta, dq, where: str = ""):
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


def seg_arrays(cu_seqlens: torch.Tensor, tk: int):
    """Per key position: first and last position of its document (int32 [Tk] each)."""
    pos = torch.arange(tk, device=cu_seqlens.device, dtype=torch.int32)
    cu = cu_seqlens.to(torch.int32)
    doc = torch.searchsorted(cu[1:], pos, right=True)
    return cu[doc].contiguous(), (cu[doc + 1] - 1).contiguous()


# TMA tensor descriptors (Hopper+, and the interpreter) for the row tiles the backward streams:
# Q/dO in dK/dV, K/V in dQ. FLASH_TMA=0 keeps pointer loads everywhere. Per kernel: measured on
# the H100 at B·T = 2 × 16k, H = 16, D = 128 (docs/flash_notes.md, "TMA descriptors").
TMA = {kind: os.environ.get("FLASH_TMA", "1") != "0" for kind in ("dkdv", "dq")}


def use_tma(kind: str, *tensors) -> bool:
    """Whether `kind`'s kernel loads its streamed tiles through TMA descriptors: enabled for the
    kernel, a Hopper-or-newer GPU (or the interpreter), 16-byte aligned bases (the descriptor's
    rule; row strides H·D·size are multiples of 16 for every supported head dim)."""
    if not TMA.get(kind, False):
        return False
    dev = tensors[0].device
    if not INTERPRET and (dev.type != "cuda" or _capability(dev.index)[0] < 9):
        return False
    if any(t.data_ptr() % 16 for t in tensors):
        return False
    # device-side descriptors (tl.make_tensor_descriptor) need scratch memory per launch; the
    # allocator is a context variable, so it is set in the calling thread every time (autograd
    # runs the backward in its own thread)
    triton.set_allocator(_scratch)
    return True


@functools.lru_cache(maxsize=None)
def _capability(index: int):
    """(major, minor) of CUDA device `index`, asked once (use_tma runs on every launch)."""
    return torch.cuda.get_device_capability(index)


def _scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cpu" if INTERPRET else "cuda")


def reg_cap(maxnreg):
    """Launch options capping a kernel's registers per thread (None: the compiler's choice;
    the interpreter takes no such option)."""
    return {} if INTERPRET or maxnreg is None else {"maxnreg": maxnreg}


# SMs the launch order plans for (interpreter: a small number, so the tests' tiny grids get
# several groups, a short leading group included); FLASH_GRID_ORDER=rows restores row-major
INTERP_SMS = 3
GRID_ORDER = os.environ.get("FLASH_GRID_ORDER", "grouped")
if GRID_ORDER not in ("grouped", "rows"):
    raise ValueError(f"FLASH_GRID_ORDER={GRID_ORDER!r}: must be 'grouped' or 'rows'")


def launch_sms(device) -> int:
    """The n_sm argument of the kernels that call heavy_first (0: row-major launch order)."""
    if GRID_ORDER == "rows":
        return 0
    return INTERP_SMS if INTERPRET else _sm_count(device.index or 0)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@triton.jit
def heavy_first(n_sm):
    """(rank, row) of this program in a grid (blocks, rows), where block rank 0 is the heaviest
    (causal: the most keys or queries to visit) and a row is one (batch, head).

    The GPU starts programs in linear order (axis 0 fastest). Row-major order (rank = axis 0)
    runs each row heaviest first, but the last row's heaviest program then starts in the last
    wave and finishes alone: list scheduling of the dK/dV grid at 4k (32 blocks x 128 rows on 132
    SMs) puts the makespan 3.4 % above the even share, 0.5 % at 16k. Here rows are taken in
    groups of G = ceil(2 * n_sm / blocks) (a group spans about two waves), rank-major inside a
    group, with the remainder group first: the last group's heavy programs start two waves
    before the end (0.3 % at 4k; G = 1, row-major, once a row alone has 2 * n_sm blocks: T >= 64k
    with 128-row blocks on an H100). Neighbouring programs stay in the same few rows, which share
    K/V or Q/dO in L2. n_sm = 0: row-major."""
    n_blk = tl.num_programs(0)
    n_rows = tl.num_programs(1)
    lin = tl.program_id(1) * n_blk + tl.program_id(0)
    group = tl.minimum(tl.maximum((2 * n_sm + n_blk - 1) // n_blk, 1), n_rows)
    rem = n_rows % group
    head = rem * n_blk                      # programs of the leading short group
    in_head = lin < head
    rest = tl.maximum(lin - head, 0)
    g = rest // (group * n_blk)
    first = tl.where(in_head, 0, rem + g * group)
    size = tl.where(in_head, rem, group)
    r = tl.where(in_head, lin, rest - g * group * n_blk)
    return r // size, first + r % size


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get true fp32 products (the contract: as accurate as the fp32 reference);
    # 16-bit inputs ignore the setting.
    return "ieee" if dtype == torch.float32 else "tf32"


def tuned_configs(table):
    """(autotune configs, prune function) from {head_dim: [(BLOCK_M, BLOCK_N, warps, stages)]}:
    each head dim is tuned over its own list (the first entry is the FLASH_AUTOTUNE=0 choice)."""
    rows = sorted({r for v in table.values() for r in v})
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
               for bm, bn, w, s in rows]

    def prune(configs, named_args, **kwargs):
        d = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))
        keep = set(table[pick_dim(table, d, named_args["V"].dtype)])
        return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps,
                                       c.num_stages) in keep]
    return configs, prune


def pick_dim(table, d, dtype):
    """The table entry for head dim d: the smallest listed head dim >= d; fp32 tiles take twice
    the bytes of 16-bit ones, so fp32 uses the entry of 2*d (512: fp32 at D = 256)."""
    d = d * 2 if dtype == torch.float32 else d
    return min(k for k in table if k >= d)


# kernel name ("fwd", "dkdv", "dq") -> (BLOCK_M, BLOCK_N, warps, stages): bypasses autotuning
# (scripts/flash_tune.py sweeps configs through it)
OVERRIDE: dict = {}


_TOLD = []  # the autotuning notice is given once per process


def use_autotune(kind: str = "") -> bool:
    off = os.environ.get("FLASH_AUTOTUNE", "1") == "0"
    on = not INTERPRET and kind not in OVERRIDE and not off
    if on and not _TOLD:
        _TOLD.append(True)
        # a first step that compiles and times several configs per kernel and shape looks like a
        # hang (context parallelism adds shapes: ring steps see Tq != Tk)
        warnings.warn("flash kernels: autotuning on the first call of every new shape (compiles "
                      "and times 3-4 configs per kernel, about a minute at first); "
                      "FLASH_AUTOTUNE=0 takes the default configs", stacklevel=3)
    return on


# interpreter-safe dot and cast (mma, cvt) are shared by every family
from attn.triton_common import cvt, mma  # noqa: E402,F401


@triton.jit
def row_lo(qpos, q_ok, SEG_START, window, HAS_SEG: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Smallest visible key position for queries at absolute positions `qpos` (tensor or scalar)."""
    lo = qpos * 0
    if HAS_WINDOW:
        lo = tl.maximum(lo, qpos - window + 1)
    if HAS_SEG:
        lo = tl.maximum(lo, tl.load(SEG_START + qpos, mask=q_ok, other=0))
    return lo


@triton.jit
def row_lo_scalar(qpos, SEG_START, window, HAS_SEG: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """row_lo for one (valid) query position."""
    lo = qpos * 0
    if HAS_WINDOW:
        lo = tl.maximum(lo, qpos - window + 1)
    if HAS_SEG:
        lo = tl.maximum(lo, tl.load(SEG_START + qpos))
    return lo


@triton.jit
def key_hi(kpos, SEG_END, window, BIG, HAS_SEG: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Largest query position that sees key `kpos` (scalar), BIG when unbounded."""
    hi = kpos * 0 + BIG
    if HAS_WINDOW:
        hi = tl.minimum(hi, kpos + window - 1)
    if HAS_SEG:
        hi = tl.minimum(hi, tl.load(SEG_END + kpos))
    return hi
