"""`attn=moba`: Mixture of Block Attention (block gating, top-k routing per query head).

Public `moba_attn` and the layer core `MoBACore`. Triton kernels on CUDA (gate.py: mean-pooled
block keys and a streaming top-(k−1) per query head; fwd.py / bwd.py: block-sparse attention
forward and backward, never T × T), the dense reference ref.py on CPU (see op.py for the
dispatch); context parallelism works through `allgather` (per-shard gating with q_offset).
"""
from __future__ import annotations

from attn.base import SoftmaxAttention
from attn.moba.op import moba_attn


class MoBACore(SoftmaxAttention):
    """Softmax attention layer with MoBA routing; keep the last layers full attention with
    model.layer_pattern (the paper's hybrid)."""

    family = "moba"
    cp_capabilities = frozenset({"head_parallel", "gather_kv"})
    cp_default = "allgather"  # per-shard gating: each rank routes its own queries

    def __init__(self, dim, n_heads, n_kv_heads, head_dim=None, layer_idx=0, n_layers=1, *,
                 block_size: int = 512, topk: int = 3, qk_norm: bool = False):
        super().__init__(dim, n_heads, n_kv_heads, head_dim, layer_idx, n_layers, qk_norm=qk_norm)
        for key, value in (("block_size", block_size), ("topk", topk)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"attn.{key}={value!r} must be an integer >= 1")
        self.block_size, self.topk = block_size, topk

    def attend(self, q, k, v, cu_seqlens=None, *, q_offset=0, heads=None):
        return moba_attn(q, k, v, block_size=self.block_size, topk=self.topk, scale=self.scale,
                         cu_seqlens=cu_seqlens, q_offset=q_offset)

    def attention_flops_per_token(self, seq_len: int) -> float:
        """Keys attended per query: half its own block plus topk−1 full blocks (at most the
        causal T/2), 4·D FLOPs each per head; plus the gate, 2·D per earlier block per head."""
        keys = min(seq_len / 2, self.block_size / 2 + (self.topk - 1) * self.block_size)
        gate = 2.0 * self.head_dim * self.n_heads * seq_len / self.block_size
        return 4.0 * self.head_dim * self.n_heads * keys + gate


__all__ = ["moba_attn", "MoBACore"]
