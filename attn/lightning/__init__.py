"""`attn=lightning`: Lightning Attention-2 (linear attention with per-head decay) in Triton.

Public: `lightning_attn` (autograd op with states in and out), the CP primitives
`lightning_fwd` / `lightning_bwd`, the layer core `LightningCore` and `alibi_slopes`. The kernels
are shared with attn/linear (attn/linear/kernels.py, decay variant); ref.py is the definition.
"""
from __future__ import annotations

from attn.lightning.core import LightningCore, alibi_slopes
from attn.lightning.op import lightning_attn, lightning_bwd, lightning_fwd

__all__ = ["lightning_attn", "lightning_fwd", "lightning_bwd", "LightningCore",
           "alibi_slopes"]
