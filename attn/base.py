"""The layer-core contract every attention family implements.

A core is one attention layer of the model: it owns its projections and whatever positional
treatment its family uses, and calls the family's op through `self.attend`. The model (models/)
builds cores from the registry and never looks inside; context parallelism (parallel/) swaps
`attend` on each core from the outside, so `attn/` never sees a process group.

forward(x, rope, cu_seqlens) -> y
    x          [B, T, dim]     the normed residual stream
    rope       callable        rotates a [B, T, H, D] tensor by the batch's positions (RoPE),
                               or None for families that use none
    cu_seqlens int32 [N+1]     document boundaries over the flattened B*T tokens, or None
    y          [B, T, dim]

attend(q, k, v, cu_seqlens=None, *, q_offset=0, heads=None, **query_inputs) -> o
    q [B, Tq, Hq, D], k/v [B, Tk, Hkv, D], o like q. When cu_seqlens is given the tensors arrive
    flattened to B == 1 (flash-attn convention). Context parallelism calls it with
    - q_offset: the queries sit at absolute positions q_offset.. of the key sequence (all-gather
      strategies; families whose op takes q_offset honour it);
    - heads: the slice of the layer's query heads that q holds (Ulysses); cores with per-head
      parameters (e.g. decay slopes) select theirs, others ignore it;
    - query_inputs: further per-query, per-head tensors [B, Tq, Hq, ...] the op needs (NSA's
      branch gates); every strategy moves them exactly as it moves q.

Context parallelism (parallel/context.py) serves a core through the capabilities it declares in
`cp_capabilities`, never through its family name:
    head_parallel  attend on a slice of the query heads (and their kv heads) is exact: heads do
                   not mix                                       -> ulysses
    gather_kv      attend(q chunk, k[:, :end], v[:, :end], cu_seqlens clipped to end,
                   q_offset=start) is exact for queries [start, end)  -> allgather
    lse_blocks     `lse_blocks()` returns the softmax block primitives (fwd -> (o, lse fp32),
                   bwd) that partial results merge through           -> ring, overlapped allgather
    state_passing  attend_with_state / log_decay / scale: a chunk's final state is linear in its
                   initial state                                   -> lasp
`cp_default` names the strategy `cp.strategy=auto` picks.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import nn


def check_heads(n_heads: int, n_kv_heads: int, dim: int, head_dim: int | None) -> int:
    """Validate the head layout of a layer; return the head dimension."""
    if n_kv_heads <= 0 or n_heads % n_kv_heads != 0:
        raise ValueError(f"model.n_kv_heads={n_kv_heads} must be > 0 and divide "
                         f"model.n_heads={n_heads} (GQA groups)")
    if head_dim is None:
        if dim % n_heads != 0:
            raise ValueError(f"model.dim={dim} must be divisible by model.n_heads={n_heads} "
                             "(or set model.head_dim)")
        head_dim = dim // n_heads
    if head_dim % 2 != 0:
        raise ValueError(f"head dim {head_dim} must be even (RoPE rotates pairs)")
    return head_dim


class AttentionCore(nn.Module, ABC):
    """Base class: registry entries subclass this and implement `forward` and `attend`."""

    #: name under which the registry knows the family (set by subclasses)
    family: str = ""
    #: what context parallelism may rely on (see the module docstring)
    cp_capabilities: frozenset = frozenset({"head_parallel"})
    #: the strategy cp.strategy=auto picks for this core
    cp_default: str = "ulysses"

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int | None = None,
                 layer_idx: int = 0, n_layers: int = 1):
        super().__init__()
        self.dim = dim
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = check_heads(n_heads, n_kv_heads, dim, head_dim)
        self.layer_idx = layer_idx
        self.n_layers = n_layers

    @abstractmethod
    def attend(self, q, k, v, cu_seqlens=None, *, q_offset=0, heads=None, **query_inputs):
        """The family's op on projected q, k, v (see the module docstring)."""

    def lse_blocks(self):
        """(fwd, bwd) softmax block primitives of a core declaring "lse_blocks":
        fwd(q, k, v, *, scale, causal=True, cu_seqlens=None) -> (o, lse [B, Hq, Tq] fp32),
        bwd(do, q, k, v, o, lse, *, scale, causal=True, cu_seqlens=None) -> (dq, dk, dv)."""
        # parallel/context.py picks lse-block strategies (ring) only for cores declaring the
        # capability, so this is reached only by a core that declares it without the primitives
        raise ValueError(f"attn={self.family}: cp_capabilities has no 'lse_blocks', so it has no "
                         "softmax block primitives (a core declaring it must override lse_blocks)")

    def attention_flops_per_token(self, seq_len: int) -> float:
        """Forward matmul FLOPs per token of the token-mixing part (projections excluded).

        Softmax default: QK^T and PV are 2·T·D MACs each per head, halved by the causal mask,
        so 2·2·(T/2)·D·Hq = 2·T·D·Hq FLOPs per token (forward).
        """
        return 2.0 * seq_len * self.head_dim * self.n_heads

    def projection_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


class SoftmaxAttention(AttentionCore):
    """Standard multi-head softmax attention with GQA and RoPE; subclasses choose the op."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int | None = None,
                 layer_idx: int = 0, n_layers: int = 1, qk_norm: bool = False):
        super().__init__(dim, n_heads, n_kv_heads, head_dim, layer_idx, n_layers)
        hd = self.head_dim
        self.wq = nn.Linear(dim, n_heads * hd, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * hd, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * hd, bias=False)
        self.wo = nn.Linear(n_heads * hd, dim, bias=False)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = nn.RMSNorm(hd, eps=1e-6)
            self.k_norm = nn.RMSNorm(hd, eps=1e-6)
        self.scale = 1.0 / math.sqrt(hd)

    def forward(self, x: torch.Tensor, rope=None, cu_seqlens=None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope(q), rope(k)
        if cu_seqlens is not None and B > 1:
            q, k, v = (t.reshape(1, B * T, *t.shape[2:]) for t in (q, k, v))
        o = self.attend(q, k, v, cu_seqlens)
        return self.wo(o.reshape(B, T, self.n_heads * self.head_dim))
