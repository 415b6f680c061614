"""Differentiable collectives over the context-parallel group, along the sequence dimension.

All tensors are [1, T, ...] (context parallelism flattens the batch to one sequence). Pairs:
- gather_seq: all-gather of every rank's tokens (rank order); backward reduce-scatters the
  gradient, so each rank receives the sum of what every rank's queries sent to its keys.
- seq_to_heads / heads_to_seq: Ulysses all-to-all; each is the other's backward.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

# torch 2.13 renamed the tensor collectives; the GPU image's torch 2.11 has only the old names
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _GatherSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        world = dist.get_world_size(group)
        flat = x[0].contiguous()                              # [T_loc, ...]
        out = flat.new_empty((world * flat.shape[0], *flat.shape[1:]))
        _all_gather(out, flat, group=group)
        return out[None]

    @staticmethod
    def backward(ctx, grad):
        world = dist.get_world_size(ctx.group)
        g = grad[0].contiguous()
        out = g.new_empty((g.shape[0] // world, *g.shape[1:]))
        _reduce_scatter(out, g, group=ctx.group)
        return out[None], None


def gather_seq(x: torch.Tensor, group) -> torch.Tensor:
    """[1, T_loc, ...] on each rank -> [1, world·T_loc, ...], shards in rank order."""
    return _GatherSeq.apply(x, group)


def _a2a_seq_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    world = dist.get_world_size(group)
    t, h = x.shape[1], x.shape[2]
    send = x[0].reshape(t, world, h // world, *x.shape[3:]).transpose(0, 1).contiguous()
    recv = torch.empty_like(send)                             # [src rank, T_loc, H/world, D]
    dist.all_to_all_single(recv, send, group=group)
    return recv.reshape(world * t, h // world, *x.shape[3:])[None]


def _a2a_heads_to_seq(x: torch.Tensor, group) -> torch.Tensor:
    world = dist.get_world_size(group)
    t = x.shape[1] // world
    send = x[0].reshape(world, t, *x.shape[2:]).contiguous()  # [dst rank, T_loc, H/world, D]
    recv = torch.empty_like(send)                             # [head group, T_loc, H/world, D]
    dist.all_to_all_single(recv, send, group=group)
    return recv.transpose(0, 1).reshape(t, world * x.shape[2], *x.shape[3:])[None]


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _a2a_seq_to_heads(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _a2a_heads_to_seq(grad, ctx.group), None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _a2a_heads_to_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _a2a_seq_to_heads(grad, ctx.group), None


def seq_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    """[1, T_loc, H, ...] sequence-sharded -> [1, world·T_loc, H/world, ...] head-sharded
    (tokens in rank order; this rank keeps head group `rank`)."""
    return _SeqToHeads.apply(x, group)


def heads_to_seq(x: torch.Tensor, group) -> torch.Tensor:
    """Inverse of seq_to_heads."""
    return _HeadsToSeq.apply(x, group)
