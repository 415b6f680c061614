"""Cross-entropy over the vocabulary in token chunks, never holding [T, vocab] logits.

Each chunk's logits are computed, reduced to a loss sum and dropped; under autograd the chunk
runs inside activation checkpointing, so backward recomputes one chunk's logits at a time. Peak
extra memory is chunk·vocab fp32 instead of T·vocab.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def chunk_loss(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of one chunk of tokens (logits in fp32)."""
    logits = h @ weight.t()
    if logits.dtype in (torch.bfloat16, torch.float16):
        logits = logits.float()  # softmax over a large vocabulary in fp32
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          chunk: int = 4096, loss_fn=chunk_loss) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of token losses and the number of counted tokens.

    hidden [..., dim], weight [vocab, dim], labels [...] (IGNORE_INDEX skipped).
    Returns (loss_sum fp32 scalar, n_tokens int64 scalar); the caller normalises, so sums over
    micro-batches, data-parallel and context-parallel ranks stay exact. `loss_fn` computes one
    chunk (chunk_loss, or a compiled version of it).
    """
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    if chunk <= 0:
        raise ValueError(f"model.loss_chunk={chunk} must be > 0")
    total = h.new_zeros((), dtype=torch.float64 if h.dtype == torch.float64 else torch.float32)
    grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    for s in range(0, h.shape[0], chunk):
        hc, yc = h[s:s + chunk], y[s:s + chunk]
        if grad:
            total = total + checkpoint(loss_fn, hc, weight, yc, use_reentrant=False)
        else:
            total = total + loss_fn(hc, weight, yc)
    return total, (y != IGNORE_INDEX).sum()
