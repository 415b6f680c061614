"""The linear and lightning families' custom ops (longctx::scan_fwd / longctx::scan_bwd) under
torch.compile, and what the layer cores keep for the backward.

Under the interpreter (ATTN_IMPL=triton), fp32, small shapes, outputs poisoned (NaN-filled
allocator): `torch.compile(..., backend="aot_eager", fullgraph=True)` gives the eager op's
output, final state and gradients of q, k, v and initial_state, with and without documents, and
again after cu_seqlens changes its number of documents (a new, dynamic shape). The eager op's
accuracy against the float64 recurrence is tested in test_linear.py / test_lightning.py.
"""
from __future__ import annotations

import gc

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from attn.common import alloc
from attn.lightning import LightningCore, lightning_attn
from attn.linear import LinearCore, kernels, launch, linear_attn, op
from scan_testlib import make_slopes, nan_empty, rel


def _attn(slopes, *args, **kw):
    return linear_attn(*args, **kw) if slopes is None else lightning_attn(*args[:3], slopes, **kw)


def _loss_and_grads(fn, slopes, q, k, v, init, cu, do, dfin):
    xs = [t.detach().clone().requires_grad_() for t in (q, k, v, init)]
    o, fin = fn(slopes, *xs, cu)
    ((o * do).sum() + (fin * dfin).sum()).backward()
    return [o.detach(), fin.detach()] + [x.grad for x in xs]


def _inputs(B, T, H, D, n_states):
    q, k, v, do = (torch.randn(B, T, H, D) for _ in range(4))
    init, dfin = torch.randn(n_states, H, D, D), torch.randn(n_states, H, D, D)
    return q, k, v, init, do, dfin


@pytest.fixture
def interpreter(monkeypatch):
    monkeypatch.setenv("ATTN_IMPL", "triton")
    monkeypatch.setattr(alloc, "empty", nan_empty)
    monkeypatch.setattr(kernels, "SEG_LEN", 64)  # several segments per document
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("docs", [False, True], ids=["batch", "documents"])
@pytest.mark.parametrize("family", ["linear", "lightning"])
def test_compiled_op_matches_eager(interpreter, family, docs):
    H, D = 2, 16
    slopes = make_slopes("mixed" if family == "lightning" else None, H)

    def fn(slopes, q, k, v, init, cu):
        return _attn(slopes, q, k, v, initial_state=init, output_final_state=True, cu_seqlens=cu)

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    calls = ([(1, 100, [0, 30, 31, 31, 100]), (1, 100, [0, 70, 100])] if docs
             else [(2, 80, None), (1, 100, None)])
    for B, T, cu in calls:
        cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32)
        q, k, v, init, do, dfin = _inputs(B, T, H, D, B if cu is None else len(cu) - 1)
        got = _loss_and_grads(compiled, slopes, q, k, v, init, cu_t, do, dfin)
        want = _loss_and_grads(fn, slopes, q, k, v, init, cu_t, do, dfin)
        for name, a, b in zip(["o", "final", "dq", "dk", "dv", "dinit"], got, want):
            assert torch.isfinite(a).all(), f"{name} has unwritten (NaN) elements"
            assert rel(a, b) < 1e-6, (name, cu, rel(a, b))


def test_compiled_op_unused_outputs(interpreter):
    """Only the final state used (o's gradient never arrives), then only o (no d final_state),
    no initial_state: compiled gradients equal the eager ones."""
    slopes = make_slopes("mixed", 2)
    q, k, v, _, do, dfin = _inputs(1, 70, 2, 16, 1)

    def only_state(q, k, v):
        return (lightning_attn(q, k, v, slopes, output_final_state=True)[1] * dfin).sum()

    def only_out(q, k, v):
        return (lightning_attn(q, k, v, slopes)[0] * do).sum()

    for f in (only_state, only_out):
        compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
        grads = []
        for g in (compiled, f):
            xs = [t.clone().requires_grad_() for t in (q, k, v)]
            grads.append(torch.autograd.grad(g(*xs), xs, allow_unused=True))
        for a, b in zip(*grads):
            assert (a is None) == (b is None)
            assert a is None or rel(a, b) < 1e-6


def test_ops_fake_and_autograd_registration(interpreter):
    """torch.library.opcheck: schema, the fake implementation's shapes (the segment-state bound
    with documents), autograd registration, and the ops traced by AOT dispatch."""
    q, k, v = (torch.randn(1, 70, 1, 16, requires_grad=True) for _ in range(3))
    init = torch.randn(3, 1, 16, 16, requires_grad=True)
    cu = torch.tensor([0, 5, 5, 70], dtype=torch.int32)
    torch.library.opcheck(op._scan_fwd_op, (q, k, v, init, torch.tensor([0.2]), 0.25, cu, "silu",
                                            "identity"))
    torch.library.opcheck(op._scan_fwd_op, (q, k, v, None, None, 0.25, None, "elu1", "relu"))


def test_segment_tables_on_device():
    """_Layout builds the tables from cu_seqlens without reading it on the host: the real rows
    are the host enumeration's, the rows up to the shape-derived bound are empty."""
    seg = 64
    for cu in ([0, 1, 1, 64, 65, 300], [0, 300], [0, 0, 0, 300], [0, 128, 256, 300]):
        lay = launch._Layout(1, 300, 2, torch.tensor(cu, dtype=torch.int32), "cpu")
        assert lay.seg == seg if kernels.SEG_LEN == seg else True
        seg = lay.seg
        rows, offs = [], [0]
        for n in range(len(cu) - 1):
            rows += [(n, s, min(s + seg, cu[n + 1])) for s in range(cu[n], cu[n + 1], seg)]
            offs.append(len(rows))
        tab = lay.seg_tab.view(-1, 3).tolist()
        assert lay.ns == 300 // seg + len(cu) - 1 >= len(rows)
        assert [tuple(r) for r in tab[:len(rows)]] == rows
        assert all(r[1] == r[2] for r in tab[len(rows):])   # empty: no rows to read or write
        assert lay.doc_seg.tolist() == offs


def _core(family, **kw):
    """dim 32, two query heads sharing one k/v head (GQA), head dim 16."""
    if family == "lightning":
        return LightningCore(32, 2, 1, layer_idx=1, n_layers=3, **kw)
    return LinearCore(32, 2, 1, gate="silu", **kw)


@pytest.mark.parametrize("family", ["linear", "lightning"])
def test_compiled_core_matches_eager(interpreter, family):
    """The layer (one projection matmul, GQA repeat, maps inside the op, recomputed norm and
    gate) compiled with fullgraph, with documents of a flattened batch, equals eager."""
    core = _core(family)
    compiled = torch.compile(core, backend="aot_eager", fullgraph=True)
    x0 = torch.randn(2, 40, 32)
    cu = torch.tensor([0, 10, 11, 70, 80], dtype=torch.int32)
    res = []
    for m in (compiled, core):
        core.zero_grad()
        x = x0.clone().requires_grad_()
        y = m(x, None, cu)
        y.square().sum().backward()
        res.append([y.detach(), x.grad] + [p.grad for p in core.parameters()])
    for a, b in zip(*res):
        assert torch.isfinite(a).all() and rel(a, b) < 1e-6


@pytest.mark.parametrize("family", ["linear", "lightning"])
def test_maps_inside_op_equal_maps_outside(interpreter, family):
    """The core's own path (feature maps applied inside the op, recomputed in its backward)
    equals the path context parallelism takes (maps first, then `attend`)."""
    core = _core(family, **({"feature_map": "elu1"} if family == "linear" else {}))
    x0 = torch.randn(1, 90, 32)
    cu = torch.tensor([0, 20, 90], dtype=torch.int32)
    res = []
    for swapped in (False, True):
        if swapped:
            core.attend = core.attend  # an instance attribute, as parallel/context.py sets
        core.zero_grad()
        x = x0.clone().requires_grad_()
        y = core(x, None, cu)
        y.square().sum().backward()
        res.append([y.detach(), x.grad] + [p.grad for p in core.parameters()])
    for a, b in zip(*res):
        assert rel(a, b) < 1e-5


class _Alive(TorchDispatchMode):
    """Records the storage of every tensor an op creates (views of `existing` tensors aside)."""

    def __init__(self, existing):
        super().__init__()
        self.existing = {t.untyped_storage()._cdata for t in existing}
        self.created = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                if s._cdata not in self.existing:
                    self.created[s._cdata] = (StorageWeakRef(s), s.nbytes())
        return out

    def alive_bytes(self):
        gc.collect()
        return sum(n for ref, n in self.created.values() if not ref.expired())


def test_core_keeps_little_for_backward(monkeypatch):
    """Bytes a lightning layer's forward leaves alive for the backward (incl. its output), per
    token, fp32: the projections' output (q, k, v, gate: 4 * dim), the op's output o, the gated
    output wo reads, the layer output: 7 * dim * 4 B (keeping both sides of the feature maps and
    the norm and gate intermediates would be 12 * dim * 4 B). Segment states are per segment,
    not per token."""
    monkeypatch.setenv("ATTN_IMPL", "triton")
    dim, per_token = 64, {}
    core = LightningCore(dim, 4, 4, layer_idx=1, n_layers=3)
    for T in (128, 256):  # one segment (a segment has >= 512 tokens)
        x = torch.randn(1, T, dim, requires_grad=True)
        mode = _Alive([x, *core.parameters()])
        with mode:
            y = core(x, None, None)
        per_token[T] = mode.alive_bytes()
        del y
    per_token = (per_token[256] - per_token[128]) / 128
    assert per_token <= 7 * dim * 4, per_token / (dim * 4)
