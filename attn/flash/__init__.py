"""`attn=flash`: causal softmax attention through our Triton FlashAttention kernels.

Public: `flash_attn` (autograd op), the CP primitives `flash_fwd` / `flash_bwd` (with lse), and
the layer core `FlashCore`. See op.py for the contract and fwd.py / bwd.py for the kernels.
"""
from __future__ import annotations

from attn.base import SoftmaxAttention
from attn.flash.op import flash_attn, flash_bwd, flash_fwd


class FlashCore(SoftmaxAttention):
    """Softmax attention layer whose op is our FlashAttention kernel."""

    family = "flash"
    cp_capabilities = frozenset({"head_parallel", "gather_kv", "lse_blocks"})
    cp_default = "allgather"

    def attend(self, q, k, v, cu_seqlens=None, *, q_offset=0, heads=None):
        return flash_attn(q, k, v, scale=self.scale, cu_seqlens=cu_seqlens, q_offset=q_offset)

    def lse_blocks(self):
        return flash_fwd, flash_bwd


__all__ = ["flash_attn", "flash_fwd", "flash_bwd", "FlashCore"]
