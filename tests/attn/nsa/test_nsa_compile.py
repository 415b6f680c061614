"""NSA's Triton path under torch.compile, in the interpreter (ATTN_IMPL=triton): the custom ops
longctx::nsa_fwd / longctx::nsa_bwd are opaque to dynamo, so `fullgraph=True` compiles a
function around nsa_attn (and the layer core, compression included) without a graph break, and
the compiled output and gradients equal eager's (the same kernels run: bit for bit), also on a
second call with a different number of documents. Both backward paths: gates folded into the
lse (gates_nonneg, NSACore's sigmoid gates) and signed gates (decided in the backward op when
nsa_attn cannot read the gates while tracing). Outputs are NaN-poisoned."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.backends.registry import lookup_backend

from attn.common import alloc
from attn.nsa import NSACore, nsa_attn
from attn.nsa.op import compress
from attn.nsa.ref import cmp_cu_seqlens
from test_nsa_op import docs, poisoned

KW = dict(cmp_block=4, cmp_stride=2, sel_block=8, topk=4, window=6)
NAMES = ["o", "dq", "dk", "dv", "dk_cmp", "dv_cmp", "dg_cmp", "dg_slc", "dg_swa"]


@pytest.fixture(autouse=True)
def triton_path(monkeypatch):
    monkeypatch.setenv("ATTN_IMPL", "triton")
    monkeypatch.setattr(alloc, "empty", poisoned)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def inputs(B, T, hq, hkv, cu, signed, off=0):
    q = torch.randn(B, T - off, hq, 16)
    k, v = torch.randn(B, T, hkv, 16), torch.randn(B, T, hkv, 16)
    kc, vc = compress(k, v, KW["cmp_block"], KW["cmp_stride"], cu_seqlens=cu)
    g = torch.rand(3, B, T - off, hq)
    return [q, k, v, kc, vc, *(2 * g - 1 if signed else g)]


def fwd_bwd(fn, tensors, do, *args):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    o = fn(*leaves, *args)
    return (o.detach(), *torch.autograd.grad(o, leaves, do))


def assert_same(got, want, names):
    for name, a, b in zip(names, got, want):
        assert torch.isfinite(a).all(), f"{name}: NaN/inf (unwritten elements)"
        assert a.shape == b.shape and (a - b).abs().max() <= 1e-6, name


def test_compiled_equals_eager_with_documents_signed_gates():
    """GQA 2, documents, signed gates with gates_nonneg=None: eager nsa_attn reads the gates,
    compiled defers to the backward op; both take the signed path. A second call with another
    document count (k_cmp in the padded layout: the same length) still matches; a k_cmp length
    that fits neither layout of cu_seqlens still raises."""
    T = 32
    targets = []
    aot_eager = lookup_backend("aot_eager")

    def backend(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return aot_eager(gm, example_inputs)

    def fn(q, k, v, kc, vc, g1, g2, g3, cu):
        return nsa_attn(q, k, v, kc, vc, g1, g2, g3, **KW, cu_seqlens=cu) * 2.0

    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    for n_docs in (2, 4):
        cu = docs(T, n_docs)
        ts = inputs(1, T, 2, 1, cu, signed=True)
        do = torch.randn_like(ts[0])
        assert_same(fwd_bwd(compiled, ts, do, cu), fwd_bwd(fn, ts, do, cu), NAMES)
    # the exact rows of 4 documents against a single document (whose exact and padded counts
    # are both larger): the exact rule reads cu_seqlens, so under compile the op checks it
    n4 = int(cmp_cu_seqlens(cu, KW["cmp_block"], KW["cmp_stride"])[-1])
    exact = [*ts[:3], ts[3][:, :n4], ts[4][:, :n4], *ts[5:]]
    with pytest.raises(ValueError, match="k_cmp has"):
        compiled(*exact, torch.tensor([0, T], dtype=torch.int32))
    assert any("nsa_fwd" in t for t in targets), targets
    assert not any("nsa_bwd" in t or "select" in t for t in targets), targets


def test_compiled_equals_eager_folded_gates():
    """No documents, batch 2, GQA 2, a CP shard (q_offset), gates >= 0 promised
    (gates_nonneg=True: the folded backward)."""
    T, off = 32, 16

    def fn(q, k, v, kc, vc, g1, g2, g3):
        return nsa_attn(q, k, v, kc, vc, g1, g2, g3, **KW, q_offset=off, gates_nonneg=True)

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    ts = inputs(2, T, 2, 1, None, signed=False, off=off)
    do = torch.randn_like(ts[0])
    assert_same(fwd_bwd(compiled, ts, do), fwd_bwd(fn, ts, do), NAMES)


def test_compiled_equals_eager_without_the_window_branch():
    """window=0 (two gates): the fake op's empty window outputs match the body's; folded gates,
    a CP shard."""
    T, off = 32, 8
    kw = dict(KW, window=0)

    def fn(q, k, v, kc, vc, g1, g2):
        return nsa_attn(q, k, v, kc, vc, g1, g2, None, **kw, q_offset=off, gates_nonneg=True)

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    ts = inputs(1, T, 2, 1, None, signed=False, off=off)[:7]
    do = torch.randn_like(ts[0])
    assert_same(fwd_bwd(compiled, ts, do), fwd_bwd(fn, ts, do), NAMES[:8])


def test_compiled_core_with_documents():
    """The layer compiled whole: projections, sigmoid gates packed into q, compression, the op,
    the output projection. With documents the compressed-block starts are computed outside the
    graph (attn/nsa/ref.py: one graph break; the op itself stays one opaque call)."""
    core = NSACore(32, 2, 1, head_dim=16, compress="mlp", **KW)
    x, dy = torch.randn(1, 32, 32), torch.randn(1, 32, 32)
    cu = docs(32, 3)
    compiled = torch.compile(core, backend="aot_eager")
    params = list(core.parameters())
    results = []
    for model in (compiled, core):
        xl = x.clone().requires_grad_()
        y = model(xl, None, cu)
        results.append((y.detach(), *torch.autograd.grad(y, [xl, *params], dy)))
    assert_same(results[0], results[1], ["y", "dx"] + [n for n, _ in core.named_parameters()])


def test_gates_nonneg_argument():
    ts = inputs(1, 24, 2, 1, None, signed=True)
    with pytest.raises(ValueError, match="gates_nonneg"):
        nsa_attn(*ts, **KW, gates_nonneg="yes")
    with pytest.raises(ValueError, match="gates_nonneg=True"):
        nsa_attn(*ts, **KW, gates_nonneg=True)
