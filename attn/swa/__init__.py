"""`attn=swa`: sliding-window causal softmax attention (each query sees its last `window` keys).

A family added by this folder and configs/attn/swa.yaml alone: the model builds it from the
registry and context parallelism serves it through the capabilities it declares (attn/base.py),
with no edit in models/ or parallel/. ref.py is the definition and CPU path, op.py the public op
(the flash kernels' window masking on CUDA).
"""
from __future__ import annotations

from attn.base import SoftmaxAttention
from attn.swa.op import swa_attn
from attn.swa.ref import swa_attn_ref


class SWACore(SoftmaxAttention):
    """Softmax attention layer over a sliding window of keys."""

    family = "swa"
    # a query chunk against the gathered key prefix is exact (gather_kv); no lse_blocks: the
    # ring's unmasked off-diagonal blocks would ignore the window
    cp_capabilities = frozenset({"head_parallel", "gather_kv"})
    cp_default = "allgather"

    def __init__(self, dim, n_heads, n_kv_heads, head_dim=None, layer_idx=0, n_layers=1, *,
                 window: int = 4096, qk_norm: bool = False):
        super().__init__(dim, n_heads, n_kv_heads, head_dim, layer_idx, n_layers, qk_norm=qk_norm)
        if isinstance(window, bool) or int(window) != window or window < 1:
            raise ValueError(f"attn.window={window!r} must be an integer >= 1")
        self.window = int(window)

    def attend(self, q, k, v, cu_seqlens=None, *, q_offset=0, heads=None):
        return swa_attn(q, k, v, window=self.window, scale=self.scale, cu_seqlens=cu_seqlens,
                        q_offset=q_offset)

    def attention_flops_per_token(self, seq_len: int) -> float:
        """4·D FLOPs per visible key and query head; a query sees min(t + 1, window) keys,
        on average (w(w+1)/2 + (T−w)·w)/T for T ≥ w (the causal (T+1)/2 below)."""
        t, w = float(seq_len), float(min(self.window, seq_len))
        keys = (w * (w + 1) / 2 + (t - w) * w) / t
        return 4.0 * self.head_dim * self.n_heads * keys


__all__ = ["swa_attn", "swa_attn_ref", "SWACore"]
