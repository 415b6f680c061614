"""Llama-style decoder: embedding, pre-norm blocks (attention core + SwiGLU), RMSNorm, head.

Single-device PyTorch: no torch.distributed here. Attention layers come from the registry in
attn/ (one family per layer, `layer_pattern`), and parallel/ applies distribution from outside.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from attn import get_core
from models.loss import chunk_loss, chunked_cross_entropy
from models.rope import Rotary


@dataclass
class ModelConfig:
    vocab_size: int
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int | None = None       # None: n_heads (plain MHA)
    head_dim: int | None = None         # None: dim // n_heads
    ffn_dim: int | None = None          # None: 8/3·dim rounded up to ffn_multiple
    ffn_multiple: int = 256
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    loss_chunk: int = 4096
    attn: str = "sdpa"                  # family of every layer unless layer_pattern says otherwise
    attn_options: dict = field(default_factory=dict)  # keyword arguments for cores of `attn`
    layer_pattern: list[str] | None = None  # per-layer families, repeated to n_layers
    layer_options: dict = field(default_factory=dict)  # family -> keyword arguments, for the
    #                                                    layer_pattern families other than `attn`

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.ffn_dim is None:
            hidden = int(8 * self.dim / 3)
            self.ffn_dim = self.ffn_multiple * math.ceil(hidden / self.ffn_multiple)
        if self.vocab_size <= 0:
            raise ValueError(f"model.vocab_size={self.vocab_size} must be > 0")

    def layer_families(self) -> list[str]:
        pattern = list(self.layer_pattern) if self.layer_pattern else [self.attn]
        return [pattern[i % len(pattern)] for i in range(self.n_layers)]


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Linear(dim, hidden, bias=False)
        self.w_up = nn.Linear(dim, hidden, bias=False)
        self.w_down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, family: str):
        super().__init__()
        options = cfg.attn_options if family == cfg.attn else cfg.layer_options.get(family, {})
        self.attn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = get_core(family)(cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
                                     layer_idx=layer_idx, n_layers=cfg.n_layers, **options)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn = SwiGLU(cfg.dim, cfg.ffn_dim)

    def forward(self, x, rope, cu_seqlens):
        x = x + self.attn(self.attn_norm(x), rope, cu_seqlens)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i, fam) for i, fam in enumerate(cfg.layer_families()))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.rotary = Rotary(self.layers[0].attn.head_dim, cfg.rope_theta)
        self.chunk_loss = chunk_loss  # one loss chunk; parallel/wrappers.py may compile it
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """GPT-2/Llama init: N(0, std) everywhere, residual outputs scaled by 1/sqrt(2·layers)."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue  # norms keep their ones, biases their zeros
            is_residual_out = name.endswith(("wo.weight", "w_down.weight", "out_proj.weight"))
            nn.init.normal_(p, 0.0, out_std if is_residual_out else std)

    @property
    def output_weight(self) -> torch.Tensor:
        return self.embed.weight if self.head is None else self.head.weight

    def hidden_states(self, input_ids, positions, cu_seqlens=None):
        """Final normed hidden states [B, T, dim]."""
        T = input_ids.shape[1]
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        rope = self.rotary.bind(positions)
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x, rope, cu_seqlens)
        return self.norm(x)

    def forward(self, input_ids, positions, labels=None, cu_seqlens=None):
        """With labels: (loss_sum, n_tokens) via chunked cross-entropy; else logits [B, T, V]
        (for short inference and tests only: logits are materialised)."""
        h = self.hidden_states(input_ids, positions, cu_seqlens)
        if labels is None:
            return h @ self.output_weight.t()
        return chunked_cross_entropy(h, self.output_weight, labels, self.cfg.loss_chunk,
                                     self.chunk_loss)

    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding:
            n -= self.embed.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3 × forward).

        Dense part: 2 FLOPs per weight (embedding lookup excluded, output head included).
        Token mixing: each layer's core counts its own (softmax counts the causal half).
        """
        dense = 2.0 * (self.num_params(exclude_embedding=True)
                       + (self.embed.weight.numel() if self.head is None else 0))
        mixing = sum(layer.attn.attention_flops_per_token(seq_len) for layer in self.layers)
        return 3.0 * (dense + mixing)
