"""Eager calls of the families' custom ops without the dispatcher.

Every family wraps its Triton forward and backward in `torch.library` custom ops, so that
torch.compile sees one opaque op per attention call. Outside a compiled graph the same op costs
host time per call in the dispatcher (schema binding, the autograd kernel, output alias checks)
that an autograd.Function around the same bodies does not (scripts/tune/dispatch_overhead.py
measures both; docs/training_notes.md). An attention layer's host time is paid per layer and
step, and short layers are host-bound. So eager calls run the op's Python body
through an autograd.Function with the op's own setup_context and backward, and compiled code
and every other tracing mechanism take the op: the same kernels either way.
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode


def plain_eager(args) -> bool:
    """Whether a call with these arguments runs eagerly on plain tensors: not traced by
    torch.compile, no dispatch mode active (make_fx, AOT dispatch, FakeTensorMode), and no tensor
    subclass among the arguments (fake, functional or distributed tensors). Anything else takes
    the custom op, which these mechanisms know how to trace."""
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return False
    return all(type(a) in (torch.Tensor, torch.nn.Parameter) for a in args
               if isinstance(a, torch.Tensor))


def op_or_body(op, body):
    """A callable running `body` (the Python function the custom op `op` was made from) in plain
    eager code (plain_eager) and `op` otherwise."""
    def call(*args):
        return body(*args) if plain_eager(args) else op(*args)
    return call


def autograd_op_or_body(op, body, setup_context, backward):
    """As op_or_body for a forward op with registered autograd (op.register_autograd(backward,
    setup_context=setup_context)): eager calls go through an autograd.Function with the same
    setup_context and backward, so gradients, saved tensors and non-differentiable outputs are
    the op's. Positional arguments only (autograd.Function.apply takes no keywords)."""
    def forward(*args):
        return body(*args)

    def setup(ctx, inputs, output):
        setup_context(ctx, inputs, output)

    def grad(ctx, *grads):
        return backward(ctx, *grads)

    # named after the body: its autograd node reads Eager_<body>Backward in graphs and profiles
    eager_op = type(f"Eager_{body.__name__.lstrip('_')}", (torch.autograd.Function,),
                    {"forward": staticmethod(forward), "setup_context": staticmethod(setup),
                     "backward": staticmethod(grad)})

    def call(*args):
        return eager_op.apply(*args) if plain_eager(args) else op(*args)
    return call
