"""`swa_attn`: sliding-window causal softmax attention, the public op of `attn=swa`.

The Triton path is the flash kernels' window masking (attn/flash: tiles wholly outside the
window are skipped, so the cost per query is O(window), not O(T)); the CPU path is ref.py.
Custom ops, autograd and the dispatch (`ATTN_IMPL=triton|ref`) are flash's.
"""
from __future__ import annotations

from attn.flash import flash_attn


def swa_attn(q, k, v, *, window: int, scale=None, cu_seqlens=None, q_offset: int = 0):
    """Causal softmax over each query's last `window` keys (itself included), [B, T, H, D]
    layout, documents and q_offset per the attention contract."""
    if isinstance(window, bool) or int(window) != window or window < 1:
        raise ValueError(f"swa_attn: window={window!r} must be an integer >= 1")
    return flash_attn(q, k, v, scale=scale, cu_seqlens=cu_seqlens, q_offset=q_offset,
                      window=int(window))
