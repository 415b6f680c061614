"""Flash-private pieces shared by the forward and backward kernels: the row bounds of the mask,
the launch order of the grids and the config tables / autotuning switch.

Masking, in one sentence: query row i sits at absolute position p = q_offset + i and may see key
s when  lo(p) <= s <= p,  where lo(p) = max(doc_start(p), p - window + 1) (each term only when
documents / a window are given). lo is non-decreasing in p, so a query block's visible keys are
[lo(first row), last row] and the keys visible to *every* row are [lo(last row), first row]; the
kernels loop over key blocks in three ranges: masked / unmasked (all pairs visible) / masked,
and skip every other block. The backward dK/dV kernel does the same over query blocks with the
per-key upper bound hi(s) = min(doc_end(s), s + window - 1).
Index arithmetic (int64 bases, int32 offsets inside tiles): attn/common/__init__.py.
"""
from __future__ import annotations

import functools
import os
import warnings

import torch
import triton
import triton.language as tl

from attn.common.launch import device_capability, pick_dim
from attn.dispatch import INTERPRET

# SMs the launch order plans for (interpreter: a small number, so the tests' tiny grids get
# several groups, a short leading group included); FLASH_GRID_ORDER=rows restores row-major
INTERP_SMS = 3
GRID_ORDER = os.environ.get("FLASH_GRID_ORDER", "grouped")
if GRID_ORDER not in ("grouped", "rows"):
    raise ValueError(f"FLASH_GRID_ORDER={GRID_ORDER!r}: must be 'grouped' or 'rows'")
# FLASH_FWD_AHEAD: the forward issues each chunk's q·k^T one chunk ahead of its softmax (fwd.py
# _fwd_inner_ahead). auto (default): on for 16-bit inputs of the D = 128 tile list, where the
# H200 A/B shows it pays; off at D = 64 (the second score tile costs occupancy) and for the
# dims and FP8 not measured (docs/flash_notes.md, run 11).
_AHEAD = os.environ.get("FLASH_FWD_AHEAD", "auto")
if _AHEAD not in ("auto", "0", "1"):
    raise ValueError(f"FLASH_FWD_AHEAD={_AHEAD!r}: must be auto, 0 or 1")
FWD_AHEAD = None if _AHEAD == "auto" else _AHEAD == "1"  # None: the auto rule


def impl_setting(var: str, default: str) -> str:
    """A Gluon-or-Triton kernel choice read from the environment at import: auto (the Gluon
    kernel on Hopper within its scope, the Triton one otherwise), triton or gluon (the Gluon
    kernel, an error outside its scope); anything else is refused naming the variable."""
    value = os.environ.get(var, default)
    if value not in ("auto", "triton", "gluon"):
        raise ValueError(f"{var}={value!r}: must be auto, triton or gluon")
    return value


# FLASH_FWD_IMPL: the forward kernel of the flash family's own ops (flash_attn, flash_fwd and
# the CP primitives), fwd_gluon.py's warp-specialized kernel or fwd.py's, for NSA's window
# branch too; FLASH_DKDV_IMPL: the split backward's dK/dV kernel, bwd_gluon.py's or bwd.py's
FWD_IMPL = impl_setting("FLASH_FWD_IMPL", "auto")
DKDV_IMPL = impl_setting("FLASH_DKDV_IMPL", "auto")


def hopper_error(t: torch.Tensor, kernel: str) -> str | None:
    """Why the Gluon `kernel` (sm_90 only) cannot run on t's device, or None."""
    if t.is_cuda and device_capability(t.device.index)[0] == 9:
        return None
    return f"the {kernel} needs a Hopper GPU (sm_90)"


def gluon_chosen(var: str, impl: str, t: torch.Tensor, kernel: str, scope) -> bool:
    """Whether the Gluon `kernel` runs under the setting var=impl (impl_setting): never for
    triton; for auto and gluon on a Hopper GPU when scope() (why these inputs are outside the
    kernel's scope, or None; called on Hopper only) is None; gluon elsewhere raises ValueError
    naming the setting and the rule."""
    if impl == "triton":
        return False
    why = hopper_error(t, kernel) or scope()
    if why is not None and impl == "gluon":
        raise ValueError(f"{var}=gluon: {why}; unset it or set {var}=auto for these inputs")
    return why is None


def fwd_ahead(tile_dim: int, fp8: bool) -> bool:
    """Whether the forward runs scores-ahead for a call whose tile list is that of tile_dim
    (pick_dim's entry: fp32 takes the entry of twice its head dim)."""
    if FWD_AHEAD is not None:
        return FWD_AHEAD
    return tile_dim == 128 and not fp8


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
    with 128-row blocks on 132 SMs). Neighbouring programs stay in the same few rows, which share
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


# kernel name ("fwd", "dkdv", "dq") -> (BLOCK_M, BLOCK_N, warps, stages): bypasses autotuning
# (scripts/tune/tune_flash.py sweeps configs through it)
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


@triton.jit
def row_lo_scalar(qpos, SEG_START, window, HAS_SEG: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """row_lo (attn/common/softmax.py) for one (valid) query position."""
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
