"""Per-block wrappers applied from outside the model: activation checkpointing, torch.compile.

Activation checkpointing keeps only each block's input and recomputes its inside in backward:
at long context the per-layer activations (q/k/v, FFN hidden, norms: ~20·T·dim bytes in bf16)
dominate memory, and this trades one extra forward per block for them. Both wrappers work in
place (instance `forward`, `Module.compile`), so parameter names and checkpoints don't change.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def _checkpointed(forward):
    def run(*args):
        if torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False)
        return forward(*args)
    return run


def apply_block_wrappers(model: nn.Module, activation_checkpointing: bool, compile_blocks: bool) -> None:
    for block in model.layers:
        if activation_checkpointing:
            block.forward = _checkpointed(block.forward)
        if compile_blocks:
            block.compile()
