"""Per-block wrappers applied from outside the model: torch.compile, activation checkpointing,
CPU offload of the checkpointed block inputs.

Order, inside out: the block's own forward is compiled (every attention family is an opaque
custom op, so the graph holds the norms, projections, RoPE, SwiGLU and residual adds around
it), then wrapped in activation checkpointing (eager, so recompute and offload stay plain
autograd), then in CPU offload. All wrappers replace the instance `forward`, so parameter names
and checkpoints don't change.

Activation checkpointing keeps only a block's input and recomputes its inside in backward: at
long context the per-layer activations (q/k/v, FFN hidden, norms: ~20·T·dim bytes in bf16)
dominate memory, and this trades one extra forward per block for them. `every=k` checkpoints
blocks 0, k, 2k, ... (the others keep their activations: less recompute where memory allows).
`offload=True` moves the tensors a checkpointed block saves (its input) to pinned host memory
until its backward, so at very long context the device holds one block's input at a time.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def _checkpointed(forward, offload: bool):
    def run(*args):
        if not torch.is_grad_enabled():
            return forward(*args)
        if offload:
            with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
                return checkpoint(forward, *args, use_reentrant=False)
        return checkpoint(forward, *args, use_reentrant=False)
    return run


@dataclass(frozen=True)
class BlockWrapping:
    """The trainer's per-block settings (trainer.activation_checkpointing, ac_every, ac_offload,
    compile); `compile_backend`: torch.compile's (tests use aot_eager, which traces the same
    graphs without generating code)."""
    activation_checkpointing: bool = False
    compile: bool = False
    every: int = 1
    offload: bool = False
    compile_backend: str = "inductor"

    def __post_init__(self):
        if int(self.every) != self.every or self.every < 1:
            raise ValueError(f"trainer.ac_every={self.every!r} must be an integer >= 1")
        if self.offload and not self.activation_checkpointing:
            raise ValueError("trainer.ac_offload=true offloads the inputs of checkpointed "
                             "blocks: it needs trainer.activation_checkpointing=true")

    @classmethod
    def from_trainer(cls, tr) -> "BlockWrapping":
        return cls(bool(tr.activation_checkpointing), bool(tr.compile), tr.get("ac_every", 1),
                   bool(tr.get("ac_offload", False)))


def apply_block_wrappers(model: nn.Module, w: BlockWrapping) -> None:
    """Wrap `model.layers` in place (see the module docstring for the order). Compiled blocks
    of one family share one graph: dynamo treats parameters as inputs, so 24 identical blocks
    compile once (plus once more when the number of documents first changes: cu_seqlens then
    becomes a dynamic shape)."""
    for i, block in enumerate(model.layers):
        forward = block.forward
        if w.compile:
            forward = torch.compile(forward, backend=w.compile_backend)
        if w.activation_checkpointing and i % w.every == 0:
            forward = _checkpointed(forward, w.offload)
        block.forward = forward
    if w.compile and hasattr(model, "chunk_loss"):
        # the loss chunk: the head matmul, the fp32 upcast and log-softmax fused around it
        model.chunk_loss = torch.compile(model.chunk_loss, backend=w.compile_backend)
