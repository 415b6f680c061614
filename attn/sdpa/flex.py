"""FlexAttention for `attn=sdpa` with documents, q_offset or a sliding window (CUDA path).

Why: one SDPA call per document needs the boundaries on the host (`cu_seqlens.tolist()`, a sync
per layer) and a Python loop of small launches (0.43x the other families at 8k with dozens of
documents per row), and `.tolist()` breaks a `torch.compile` graph. A dense boolean mask would
cost O(T²) memory and compute. FlexAttention runs the same softmax with a block-sparse mask:
blocks no query of a tile may see are skipped, fully visible blocks run unmasked, and only the
boundary blocks evaluate the mask per element. The computation stays exactly the family's
contract (softmax attention, causal, per document): no other family's kernel is substituted.

The mask in one form for every case: query i (absolute position p = q_offset + i) sees the
keys lo[i] <= j <= hi[i], with hi[i] = p (causal) and lo[i] = the start of p's document, raised
to p - window + 1 under a window. Documents are contiguous, so "same document and j <= p" is
exactly "doc_start(p) <= j <= p". The mask closure captures only the two [Tq] index tensors
(no Python ints), so a new batch, q_offset or window re-uses the compiled kernel.

The block mask is built from lo/hi directly, at tile granularity (O(T²/128²) work, no [T, T]
tensor and no host sync), instead of `create_block_mask`, which evaluates the mask on every
[Tq, Tk] element.
"""
from __future__ import annotations

import functools
from collections import OrderedDict

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from attn.common.checks import check_cu_seqlens

#: FlexAttention's default sparse block (tile) size, in tokens, for both q and kv
BLOCK = 128

# FlexAttention is only fast compiled (eager runs a dense reference implementation). Outside a
# compiled region we call this wrapper; inside one (trainer.compile=true) we call flex_attention
# itself so that it fuses into the surrounding graph. dynamic=False: training uses one T, and
# static shapes give the tuned kernels; a new T compiles once more. Made on first use: creating
# a torch.compile wrapper imports dynamo and inductor (seconds), which CPU runs never need.
@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def row_bounds(tq: int, tk: int, q_offset: int, cu_seqlens: torch.Tensor | None,
               window: int | None, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi), int32 [tq]: query i sees keys lo[i] <= j <= hi[i] (see the module docstring)."""
    qpos = torch.arange(q_offset, q_offset + tq, device=device, dtype=torch.int32)
    hi = qpos
    if cu_seqlens is None:
        lo = torch.zeros_like(qpos)
    else:
        cu = cu_seqlens.to(device=device, dtype=torch.int32)
        # document of position p: cu[d] <= p < cu[d+1] (right=True steps over empty documents)
        doc = torch.searchsorted(cu[1:], qpos, right=True)
        lo = cu[doc]
    if window is not None:
        lo = torch.maximum(lo, qpos - (window - 1))
    return lo, hi


def _tiles(x: torch.Tensor, n: int, fill: int) -> torch.Tensor:
    """x [t] padded with `fill` to n·BLOCK and viewed as [n, BLOCK]."""
    return torch.nn.functional.pad(x, (0, n * BLOCK - x.shape[0]), value=fill).view(n, BLOCK)


def _ordered(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[nq, nk] bool -> (num [1, 1, nq], indices [1, 1, nq, nk]) int32: the BlockMask format,
    each row's block indices first (ascending), the rest unspecified."""
    d = dense.to(torch.int32)
    num = d.sum(-1).to(torch.int32)
    idx = torch.argsort(d, dim=-1, descending=True, stable=True).to(torch.int32)
    return num[None, None].contiguous(), idx[None, None].contiguous()


def build_block_mask(tq: int, tk: int, q_offset: int = 0, cu_seqlens: torch.Tensor | None = None,
                     window: int | None = None, device=None) -> BlockMask:
    """The BlockMask of the contract's mask (one mask for every batch row and head).

    Tile (i, j) is
      - skipped when no query of tile i sees a key of tile j: the keys visible to the tile's
        queries form one interval [min lo, max hi] (lo and hi never decrease along the queries
        and every real query sees itself, so the rows' intervals overlap or touch), so this test
        is exact;
      - full (run without evaluating the mask) when every query sees every key of the tile:
        max lo <= first key and min hi >= last key; tiles holding padding past Tq or Tk are
        never full, so the mask (and FlexAttention's own bounds) handles the padding;
      - partial otherwise (mask_mod evaluated per element).
    """
    lo, hi = row_bounds(tq, tk, q_offset, cu_seqlens, window, device)
    nq, nk = -(-tq // BLOCK), -(-tk // BLOCK)
    big = torch.iinfo(torch.int32).max
    min_lo = _tiles(lo, nq, big).amin(1)[:, None]
    max_lo = _tiles(lo, nq, big).amax(1)[:, None]       # padded tile: never full
    min_hi = _tiles(hi, nq, -1).amin(1)[:, None]        # padded tile: never full
    max_hi = _tiles(hi, nq, -1).amax(1)[:, None]
    first = torch.arange(nk, device=lo.device, dtype=torch.int32)[None, :] * BLOCK
    last = first + (BLOCK - 1)                          # past Tk on the last tile: never full
    any_visible = (min_lo <= torch.clamp(last, max=tk - 1)) & (max_hi >= first)
    full = (max_lo <= first) & (min_hi >= last)
    kv_num, kv_idx = _ordered(any_visible & ~full)
    full_num, full_idx = _ordered(full)
    # mask_mod reads lo/hi at q_idx; padded to whole tiles (with an empty range) so that no
    # index FlexAttention may form inside the last tile reads past the tensors
    lo_p = torch.nn.functional.pad(lo, (0, nq * BLOCK - tq), value=1)
    hi_p = torch.nn.functional.pad(hi, (0, nq * BLOCK - tq), value=0)

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx >= lo_p[q_idx]) & (kv_idx <= hi_p[q_idx])

    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=BLOCK,
                                    mask_mod=mask_mod, seq_lengths=(tq, tk))


# Eager mode: all layers of a forward (and the backward) share one batch's mask; build it once.
# Keyed on the cu_seqlens tensor's identity and version counter (an in-place refill bumps it)
# plus the shapes and arguments; the entry keeps the tensor alive, so its id is not reused by a
# new batch's tensor while the entry lives. No host sync on a hit (torch.equal would sync). Not
# seen: writes that bypass the version counter (through `.data`, or foreign memory such as
# numpy); the data path hands over a new or in-place-copied tensor per batch. Two entries: one
# batch is live at a time (its forward, checkpoint recompute and backward share it); a mask holds
# four [nq, nk] int32 tile tables (16 MiB at 128k tokens), so old batches are not kept.
_CACHE: OrderedDict = OrderedDict()
_CACHE_SIZE = 2


def _cache_key(cu, tq, tk, q_offset, window, device, batch):
    if cu is None:
        return (None, tq, tk, q_offset, window, str(device))
    if cu.is_inference():        # inference tensors have no version counter: don't cache
        return None
    # batch: a hit skips check_cu_seqlens, whose verdict also depends on it
    return (id(cu), cu._version, cu.data_ptr(), tq, tk, q_offset, window, str(device), batch)


def block_mask_for(tq: int, tk: int, q_offset: int, cu_seqlens: torch.Tensor | None,
                   window: int | None, device, batch: int) -> BlockMask:
    """The block mask for this call: traced fresh inside torch.compile (a few tiny tensor ops per
    layer, part of the graph), cached across layers in eager mode. cu_seqlens' values are
    validated (one host sync) whenever a mask is built, i.e. once per batch in eager mode."""
    if torch.compiler.is_compiling():
        if cu_seqlens is not None:
            check_cu_seqlens(cu_seqlens, batch, tk)      # layout only while tracing
        return build_block_mask(tq, tk, q_offset, cu_seqlens, window, device)
    key = _cache_key(cu_seqlens, tq, tk, q_offset, window, device, batch)
    hit = _CACHE.get(key) if key is not None else None
    if hit is not None:
        _CACHE.move_to_end(key)
        return hit[1]
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, batch, tk)
    bm = build_block_mask(tq, tk, q_offset, cu_seqlens, window, device)
    if key is not None:
        _CACHE[key] = (cu_seqlens, bm)
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return bm


def flex_sdpa(q, k, v, scale: float, *, cu_seqlens=None, q_offset: int = 0, window=None,
              compiled: bool | None = None):
    """Causal softmax attention through FlexAttention; [B, T, H, D] in and out (inputs already
    validated by sdpa_attn). `compiled`: None picks the compiled wrapper in eager mode and the
    bare op while torch.compile traces; False forces the bare op (eager: torch's dense reference
    implementation, used by the CPU tests)."""
    B, tq, hq, _ = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    bm = block_mask_for(tq, tk, q_offset, cu_seqlens, window, q.device, B)
    if compiled is None:
        compiled = not torch.compiler.is_compiling()
    fn = _compiled_flex() if compiled else flex_attention
    o = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=bm, scale=scale,
           enable_gqa=hq != hkv)
    return o.transpose(1, 2)
