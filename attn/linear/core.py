"""Layer cores of the linear-attention families (shared base, and `LinearCore`).

A core projects x to q, k, v, applies its feature map / activation, calls `self.attend` (the
public op, swapped by context parallelism), normalizes the output, optionally gates it with a
projection of x, and projects back. No RoPE (positions enter through the causal recurrence and,
for lightning, the decay).

GQA (model.n_kv_heads < n_heads): k and v are projected to n_kv_heads heads (the parameter
count the model config asks for) and each is shared by its group of query heads by repeating
it before the op, which needs one head count (its state is per head).
"""
from __future__ import annotations

from abc import abstractmethod

import torch
import torch.nn.functional as F
from torch import nn

from attn.base import AttentionCore

CHUNK = 64  # the kernels' intra-chunk tile, for the FLOP count

_MAPS = {
    "identity": lambda x: x,
    "elu1": lambda x: F.elu(x) + 1.0,
    "relu": F.relu,
    "silu": F.silu,
}
_GATES = {"none": None, "sigmoid": torch.sigmoid, "silu": F.silu}
_NORMS = ("head", "full", "none")


def _pick(table, value, key):
    if value not in table:
        raise ValueError(f"attn.{key}={value!r} is not one of {', '.join(table)}")
    return table[value]


class ScanCore(AttentionCore):
    """Shared body: projections, q/k feature map, v activation, output norm, gate."""

    def __init__(self, dim, n_heads, n_kv_heads, head_dim=None, layer_idx=0, n_layers=1, *,
                 qk_map="identity", v_map="identity", norm="head", gate="none", scale=None,
                 norm_eps=1e-5):
        super().__init__(dim, n_heads, n_kv_heads, head_dim, layer_idx, n_layers)
        hd = self.head_dim
        self.qk_map = _pick(_MAPS, qk_map, "feature_map")
        self.v_map = _pick(_MAPS, v_map, "activation")
        self.gate_fn = _pick(_GATES, gate, "gate")
        if norm not in _NORMS:
            raise ValueError(f"attn.norm={norm!r} is not one of {', '.join(_NORMS)}")
        self.wq = nn.Linear(dim, n_heads * hd, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * hd, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * hd, bias=False)
        self.wo = nn.Linear(n_heads * hd, dim, bias=False)
        self.wg = nn.Linear(dim, n_heads * hd, bias=False) if self.gate_fn is not None else None
        self.norm_kind = norm
        self.out_norm = (nn.RMSNorm(hd, eps=norm_eps) if norm == "head" else
                         nn.RMSNorm(n_heads * hd, eps=norm_eps) if norm == "full" else None)
        self.scale = hd ** -0.5 if scale is None else float(scale)

    def forward(self, x, rope=None, cu_seqlens=None):
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        q = self.qk_map(self.wq(x).view(B, T, H, D))
        k = self.qk_map(self.wk(x).view(B, T, Hkv, D))
        v = self.v_map(self.wv(x).view(B, T, Hkv, D))
        if Hkv != H:
            k, v = (t.repeat_interleave(H // Hkv, dim=2) for t in (k, v))
        if cu_seqlens is not None and B > 1:
            q, k, v = (t.reshape(1, B * T, H, D) for t in (q, k, v))
        o = self.attend(q, k, v, cu_seqlens).reshape(B, T, H, D)
        if self.norm_kind == "head":
            o = self.out_norm(o)
        o = o.reshape(B, T, H * D)
        if self.norm_kind == "full":
            o = self.out_norm(o)
        if self.wg is not None:
            o = o * self.gate_fn(self.wg(x))
        return self.wo(o)

    def attention_flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token of the chunked form, per head: the right product q·S and
        the state update k^T v (2·D·D each), plus the intra-chunk left products q k^T and P v
        (2·C·D each) over the causal half of a chunk of C = 64 tokens (the kernels compute the
        full C×C tile; the count is the algorithm's, like the softmax count)."""
        c = min(CHUNK, seq_len)
        return float(self.n_heads * (4 * self.head_dim ** 2 + 2 * c * self.head_dim))


    # --- the op, and the hooks context parallelism uses (parallel/lasp.py, parallel/ulysses.py)
    @abstractmethod
    def _op(self, q, k, v, cu_seqlens, initial_state, want_state, heads):
        """(o, final_state or None) of the family's op."""

    def attend(self, q, k, v, cu_seqlens=None, heads=None):
        """o = op(q, k, v) from a zero state; `heads` (a slice of this layer's heads, given by
        Ulysses) selects per-head constants such as lightning's slopes."""
        return self._op(q, k, v, cu_seqlens, None, False, heads)[0]

    def attend_with_state(self, q, k, v, cu_seqlens=None, initial_state=None, heads=None):
        """(o, final_state fp32 [N_docs, H, Dk, Dv]) from `initial_state` (None: zeros), both
        differentiable: LASP chains chunks through them."""
        return self._op(q, k, v, cu_seqlens, initial_state, True, heads)

    def final_state(self, k, v, cu_seqlens=None, initial_state=None, heads=None):
        """Only the final state (differentiable), no outputs: LASP's first pass."""
        return self._state_op(k, v, cu_seqlens, initial_state, heads)

    @abstractmethod
    def _state_op(self, k, v, cu_seqlens, initial_state, heads):
        """The final state alone (differentiable)."""

    def log_decay(self) -> torch.Tensor:
        """Per-token log decay of the state per head, [H] fp32 <= 0 (0: no decay)."""
        return torch.zeros(self.n_heads, device=self.wq.weight.device)


class LinearCore(ScanCore):
    """`attn=linear`: o = Norm(scale·φ(q) Σ φ(k)^T v) (optionally gated), φ configurable."""

    family = "linear"

    def __init__(self, dim, n_heads, n_kv_heads, head_dim=None, layer_idx=0, n_layers=1, *,
                 feature_map="elu1", norm="head", gate="none", scale=None):
        if feature_map not in ("identity", "elu1", "relu"):
            raise ValueError(f"attn.feature_map={feature_map!r} is not one of identity, elu1, relu")
        super().__init__(dim, n_heads, n_kv_heads, head_dim, layer_idx, n_layers,
                         qk_map=feature_map, norm=norm, gate=gate, scale=scale)

    def _op(self, q, k, v, cu_seqlens, initial_state, want_state, heads):
        from attn.linear.op import linear_attn
        return linear_attn(q, k, v, scale=self.scale, initial_state=initial_state,
                           output_final_state=want_state, cu_seqlens=cu_seqlens)

    def _state_op(self, k, v, cu_seqlens, initial_state, heads):
        from attn.linear.op import linear_state
        return linear_state(k, v, initial_state=initial_state, cu_seqlens=cu_seqlens)
