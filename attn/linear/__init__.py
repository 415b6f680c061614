"""`attn=linear`: causal linear attention through our Triton chunked-scan kernels.

Public: `linear_attn` (autograd op with states in and out), the CP primitives `linear_fwd` /
`linear_bwd`, and the layer core `LinearCore`. ref.py is the definition and CPU path, kernels.py
the Triton kernels (shared with attn/lightning, which adds the per-head decay), op.py the
dispatch and autograd, core.py the layer.
"""
from __future__ import annotations

from attn.linear.core import LinearCore
from attn.linear.op import linear_attn, linear_bwd, linear_fwd

__all__ = ["linear_attn", "linear_fwd", "linear_bwd", "LinearCore"]
