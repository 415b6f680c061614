"""`LightningCore`: the TransNormerLLM / Lightning Attention layer.

    q, k, v = SiLU(x Wq), SiLU(x Wk), SiLU(x Wv)          (no RoPE)
    o = lightning_attn(q, k, v, slopes_l)                   (decay exp(-slope) per head and step)
    y = (RMSNorm(o) ⊙ σ(x Wg)) Wo                           (norm per head, sigmoid gate)
Slopes: ALiBi's geometric sequence per head, 2^(-decay_base·(h+1)/H) for H a power of two
(otherwise the ALiBi recipe: the power of two below, then every other slope of the next one),
scaled by depth as TransNormerLLM does: slope_h · (1 − l/(L−1) + 1e-5), so the first layer
decays fastest (local) and the last one barely at all (global). They are constants: a
non-persistent fp32 buffer (not a parameter, not in the state dict, moved with the module), so a
compiled forward reads the same tensor on every call.
"""
from __future__ import annotations

import math

import torch

from attn.linear.core import ScanCore
from attn.linear.op import scan_attn

LAYER_EPS = 1e-5  # TransNormerLLM's floor on the depth factor: the last layer keeps a tiny decay


def alibi_slopes(n_heads: int, base: float = 8.0) -> list[float]:
    """ALiBi's per-head slopes (base 8 gives 2^-8/H, 2^-16/H, ..., 2^-8)."""
    def pow2(n):
        return [2.0 ** (-base * (i + 1) / n) for i in range(n)]
    if n_heads & (n_heads - 1) == 0:
        return pow2(n_heads)
    p = 2 ** math.floor(math.log2(n_heads))
    return pow2(p) + pow2(2 * p)[0::2][: n_heads - p]


class LightningCore(ScanCore):
    """`attn=lightning` (see the module docstring)."""

    family = "lightning"

    def __init__(self, dim, n_heads, n_kv_heads, head_dim=None, layer_idx=0, n_layers=1, *,
                 activation="silu", norm="head", gate="sigmoid", decay_base=8.0,
                 layer_scaled_decay=True, scale=None):
        if activation not in ("silu", "identity"):
            raise ValueError(f"attn.activation={activation!r} is not one of silu, identity")
        super().__init__(dim, n_heads, n_kv_heads, head_dim, layer_idx, n_layers,
                         qk_map=activation, v_map=activation, norm=norm, gate=gate, scale=scale)
        if not decay_base > 0:
            raise ValueError(f"attn.decay_base={decay_base} must be > 0")
        depth = 1.0 - layer_idx / (n_layers - 1) + LAYER_EPS if n_layers > 1 else 1.0
        self.slopes_list = [s * (depth if layer_scaled_decay else 1.0)
                            for s in alibi_slopes(n_heads, decay_base)]
        self.register_buffer("slopes_buf", torch.tensor(self.slopes_list, dtype=torch.float32),
                             persistent=False)
        self._slopes = {}

    def slopes(self, device) -> torch.Tensor:
        return self.slopes_buf.to(device)  # the buffer itself when it is on `device`

    def _op(self, q, k, v, cu_seqlens, initial_state, want_state, heads, maps=None):
        slopes = self.slopes(q.device)
        if heads is not None:
            slopes = self._head_slopes(slopes, heads)
        return scan_attn("lightning_attn", q, k, v, slopes, self.scale, initial_state,
                         want_state, cu_seqlens, decay=True,
                         maps=maps or ("identity", "identity"))

    def _head_slopes(self, slopes, heads):
        key = (str(slopes.device), str(heads))
        if key not in self._slopes:  # cached: the op validates a new slopes tensor once
            self._slopes[key] = slopes[heads].contiguous()
        return self._slopes[key]

    def log_decay(self) -> torch.Tensor:
        return -self.slopes(self.wq.weight.device)
