"""MoBA's Triton path under torch.compile, in the interpreter (ATTN_IMPL=triton): the custom ops
longctx::moba_fwd / longctx::moba_bwd are opaque to dynamo, so `fullgraph=True` compiles a
function around moba_attn (and the layer core) without a graph break, and the compiled output
and gradients equal eager's (the same kernels run: bit for bit), also on a second call with a
different number of documents. Outputs are NaN-poisoned (unwritten elements fail)."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.backends.registry import lookup_backend

from attn.common import alloc
from attn.moba import MoBACore, moba_attn
from moba_testlib import nan_empty, random_docs


@pytest.fixture(autouse=True)
def triton_path(monkeypatch):
    monkeypatch.setenv("ATTN_IMPL", "triton")
    monkeypatch.setattr(alloc, "empty", nan_empty)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def recording_backend(targets):
    """aot_eager that also records the call targets of every graph dynamo hands it."""
    aot_eager = lookup_backend("aot_eager")

    def backend(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return aot_eager(gm, example_inputs)
    return backend


def fwd_bwd(fn, tensors, do, *args):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    o = fn(*leaves, *args)
    return (o.detach(), *torch.autograd.grad(o, leaves, do))


def assert_same(got, want, names):
    for name, a, b in zip(names, got, want):
        assert torch.isfinite(a).all(), f"{name}: NaN/inf (unwritten elements)"
        assert a.shape == b.shape and (a - b).abs().max() <= 1e-6, name


def test_compiled_equals_eager_with_documents():
    """GQA 2, uneven documents (one of length 1), then another document count: a recompile
    with cu_seqlens of a new length, still one opaque op; bad cu_seqlens values still raise."""
    T, kw = 48, dict(block_size=8, topk=3)

    def fn(q, k, v, cu):
        return torch.tanh(moba_attn(q * 0.5, k, v, cu_seqlens=cu, **kw))

    targets = []
    compiled = torch.compile(fn, backend=recording_backend(targets), fullgraph=True)
    q, k, v, do = (torch.randn(1, T, h, 16) for h in (2, 1, 1, 2))
    for n_docs in (3, 5):
        cu = random_docs(T, n_docs)
        assert_same(fwd_bwd(compiled, (q, k, v), do, cu), fwd_bwd(fn, (q, k, v), do, cu),
                    ["o", "dq", "dk", "dv"])
    # the value rules of cu_seqlens cannot be traced: the op checks them when it runs
    bad = torch.tensor([0, 30, 20, T], dtype=torch.int32)
    with pytest.raises(ValueError, match="non-decreasing"):
        compiled(q, k, v, bad)
    assert any("moba_fwd" in t for t in targets), targets
    assert not any("moba_bwd" in t or "select" in t for t in targets), targets  # no kernels traced


@pytest.mark.parametrize("topk", [3, 1])
def test_compiled_equals_eager_without_documents(topk):
    """Batch 2, GQA 2, a CP shard's queries (q_offset); topk 1: own block only (no index)."""
    Tk, Tq, off = 48, 24, 24

    def fn(q, k, v):
        return moba_attn(q, k, v, block_size=8, topk=topk, q_offset=off) * 2.0

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    q, do = torch.randn(2, Tq, 2, 16), torch.randn(2, Tq, 2, 16)
    k, v = torch.randn(2, Tk, 1, 16), torch.randn(2, Tk, 1, 16)
    assert_same(fwd_bwd(compiled, (q, k, v), do), fwd_bwd(fn, (q, k, v), do),
                ["o", "dq", "dk", "dv"])


def test_compiled_core_with_documents():
    """The layer (projections, view, op, output projection) compiled whole: same output and
    gradients of the input and of every weight."""
    core = MoBACore(32, 2, 1, head_dim=16, block_size=8, topk=3)
    x, dy = torch.randn(1, 40, 32), torch.randn(1, 40, 32)
    cu = random_docs(40, 3)
    compiled = torch.compile(core, backend="aot_eager", fullgraph=True)
    params = list(core.parameters())
    results = []
    for model in (compiled, core):
        xl = x.clone().requires_grad_()
        y = model(xl, None, cu)
        results.append((y.detach(), *torch.autograd.grad(y, [xl, *params], dy)))
    assert_same(results[0], results[1], ["y", "dx", "dwq", "dwk", "dwv", "dwo"])
