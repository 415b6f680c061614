"""Rotary position embedding with positions taken from the batch.

Positions come with every batch ([B, T] int64) instead of being implied by the index, so
packed documents restart at 0 and a context-parallel shard carries its global positions.
"""
from __future__ import annotations

import torch
from torch import nn


class Rotary(nn.Module):
    """Holds the inverse frequencies; `bind(positions)` returns the rotation for one batch."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head dim, got {head_dim}")
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def bind(self, positions: torch.Tensor) -> "BoundRotary":
        # angles in fp32: bf16 positions lose integer precision past 256
        ang = positions.float()[..., None] * self.inv_freq  # [B, T, D/2]
        return BoundRotary(torch.cos(ang), torch.sin(ang))


class BoundRotary:
    """Callable applying RoPE (rotate-half convention) to [B, T, H, D] tensors."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor):
        self.cos = cos[:, :, None, :]  # [B, T, 1, D/2], broadcast over heads
        self.sin = sin[:, :, None, :]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)
        out = torch.cat((x1 * self.cos - x2 * self.sin, x2 * self.cos + x1 * self.sin), dim=-1)
        return out.to(x.dtype)
