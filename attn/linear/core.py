"""Layer cores of the linear-attention families (shared base, and `LinearCore`).

A core projects x to q, k, v, applies its feature map / activation, calls `self.attend` (the
public op, swapped by context parallelism), normalizes the output, optionally gates it with a
projection of x, and projects back. No RoPE (positions enter through the causal recurrence and,
for lightning, the decay). When `attend` is the core's own, the op applies the feature maps
itself (scan_attn's maps=), which spares it keeping both their inputs and outputs.

GQA (model.n_kv_heads < n_heads): k and v are projected to n_kv_heads heads (the parameter
count the model config asks for) and each is shared by its group of query heads by repeating
it before the op, which needs one head count (its state is per head).

Memory kept for the backward (what autograd saves per token, bf16 autocast): one bf16 copy of
x (one matmul for q, k, v and the gate instead of four, each of which would keep its own cast
of x), the projections' output (the op keeps the feature maps' inputs and recomputes the maps;
the gate's input is part of the same tensor), the op's output and wo's input, plus the segment
states. The output norm and gate are recomputed in the backward from o and the gate's input
(under autocast RMSNorm runs in fp32 and would keep two fp32 copies of o). With dim 1024 that
is 14 KB per token and layer, as a softmax layer (attn/base.py) keeps; four casts of x, both
sides of the maps and the fp32 norm tensors would be 32 KB.
"""
from __future__ import annotations

from abc import abstractmethod

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from attn.base import AttentionCore
from attn.linear.op import MAPS, apply_map, scan_attn

CHUNK = 64  # the kernels' intra-chunk tile, for the FLOP count

_GATES = {"none": None, "sigmoid": torch.sigmoid, "silu": F.silu}
_NORMS = ("head", "full", "none")


def _pick(table, value, key):
    if value not in table:
        raise ValueError(f"attn.{key}={value!r} is not one of {', '.join(table)}")
    return table[value]


class ScanCore(AttentionCore):
    """Shared body: projections, q/k feature map, v activation, output norm, gate."""

    cp_capabilities = frozenset({"head_parallel", "state_passing"})
    cp_default = "lasp"

    def __init__(self, dim, n_heads, n_kv_heads, head_dim=None, layer_idx=0, n_layers=1, *,
                 qk_map="identity", v_map="identity", norm="head", gate="none", scale=None,
                 norm_eps=1e-5):
        super().__init__(dim, n_heads, n_kv_heads, head_dim, layer_idx, n_layers)
        hd = self.head_dim
        for name, key in ((qk_map, "feature_map"), (v_map, "activation")):
            if name not in MAPS:
                raise ValueError(f"attn.{key}={name!r} is not one of {', '.join(MAPS)}")
        self.map_names = (qk_map, v_map)
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
        weights = [self.wq.weight, self.wk.weight, self.wv.weight]
        if self.wg is not None:
            weights.append(self.wg.weight)
        y = F.linear(x, torch.cat(weights))
        q = y[..., :H * D].view(B, T, H, D)
        k = y[..., H * D:(H + Hkv) * D].view(B, T, Hkv, D)
        v = y[..., (H + Hkv) * D:(H + 2 * Hkv) * D].view(B, T, Hkv, D)
        g = y[..., (H + 2 * Hkv) * D:] if self.wg is not None else None
        if Hkv != H:
            k, v = (t.repeat_interleave(H // Hkv, dim=2) for t in (k, v))
        if cu_seqlens is not None and B > 1:
            q, k, v = (t.reshape(1, B * T, H, D) for t in (q, k, v))
        if "attend" in self.__dict__:
            # context parallelism swapped `attend` (parallel/context.py): its strategies work
            # on the mapped q, k, v
            qk_map, v_map = self.map_names
            q, k, v = (apply_map(qk_map, q).contiguous(), apply_map(qk_map, k).contiguous(),
                       apply_map(v_map, v).contiguous())
            o = self.attend(q, k, v, cu_seqlens)
        else:
            o = self._op(q, k, v, cu_seqlens, None, False, None, maps=self.map_names)[0]
        o = o.reshape(B, T, H, D)
        if self.norm_kind == "none" and g is None:
            o = o.reshape(B, T, H * D)
        elif torch.is_grad_enabled():
            # recomputed in the backward: keeps o and g (bf16) instead of the fp32 norm
            # input and output; no randomness inside, so no RNG state to stash
            o = checkpoint(self._norm_gate, o, g, use_reentrant=False, preserve_rng_state=False)
        else:
            o = self._norm_gate(o, g)
        return self.wo(o)

    def _norm_gate(self, o, g):
        """[B, T, H, D] -> [B, T, H*D]: output norm, then the gate."""
        B, T, H, D = o.shape
        if self.norm_kind == "head":
            o = self.out_norm(o)
        o = o.reshape(B, T, H * D)
        if self.norm_kind == "full":
            o = self.out_norm(o)
        if g is not None:
            o = o * self.gate_fn(g)
        return o

    def attention_flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token of the chunked form, per head: the right product q·S and
        the state update k^T v (2·D·D each), plus the intra-chunk left products q k^T and P v
        (2·C·D each) over the causal half of a chunk of C = 64 tokens (the kernels compute the
        full C×C tile; the count is the algorithm's, like the softmax count)."""
        c = min(CHUNK, seq_len)
        return float(self.n_heads * (4 * self.head_dim ** 2 + 2 * c * self.head_dim))

    # --- the op, and the hooks context parallelism uses (parallel/lasp.py, parallel/ulysses.py)
    @abstractmethod
    def _op(self, q, k, v, cu_seqlens, initial_state, want_state, heads, maps=None):
        """(o, final_state or None) of the family's op; maps (names of the q/k and v feature
        maps): the op applies them to q, k, v first (forward's own path)."""

    def attend(self, q, k, v, cu_seqlens=None, *, q_offset=0, heads=None):
        """o = op(q, k, v) from a zero state; `heads` (a slice of this layer's heads, given by
        Ulysses) selects per-head constants such as lightning's slopes. Queries start at key 0
        (a state carries the past: no q_offset, see `attend_with_state`)."""
        if q_offset:
            raise ValueError(f"q_offset={q_offset}: attn={self.family} takes no q_offset; its "
                             "past enters through initial_state (attend_with_state)")
        return self._op(q, k, v, cu_seqlens, None, False, heads)[0]

    def attend_with_state(self, q, k, v, cu_seqlens=None, initial_state=None, heads=None):
        """(o, final_state fp32 [N_docs, H, Dk, Dv]) from `initial_state` (None: zeros), both
        differentiable: LASP chains chunks through them."""
        return self._op(q, k, v, cu_seqlens, initial_state, True, heads)

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

    def _op(self, q, k, v, cu_seqlens, initial_state, want_state, heads, maps=None):
        return scan_attn("linear_attn", q, k, v, None, self.scale, initial_state, want_state,
                         cu_seqlens, decay=False, maps=maps or ("identity", "identity"))

