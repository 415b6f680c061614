"""Causal linear attention (`attn=linear`): Triton kernels (no-decay variant; interpreter on CPU)
against the float64 recurrence, states in/out, documents, dtypes, CP primitives, bad input, the
layer core. Rules and error measure: scan_testlib.py."""
from __future__ import annotations

import json
import math

import pytest
import torch

from attn import get_core
from attn.common import alloc
from attn.linear import LinearCore, launch, linear_attn, linear_bwd, linear_fwd, op
from attn.linear import ref as R
from scan_testlib import (assert_chunks_carrying_state_equal_one_call, check_case, nan_empty,
                          random_docs, rel)


@pytest.mark.parametrize("B,T,H,D,seg", [(2, 130, 2, 16, 128), (1, 1, 1, 16, None),
                                         (1, 100, 2, 32, 64), (3, 77, 1, 32, None)])
def test_matches_recurrence_fp32(monkeypatch, B, T, H, D, seg):
    """Outputs, final state and all gradients (incl. d initial_state, with d final_state != 0);
    T not a multiple of the 64-token chunk, T = 1, several segments (seg) or one."""
    check_case(monkeypatch, slopes=None, B=B, T=T, H=H, D=D, seg_len=seg)


def test_many_segments_scan_groups(monkeypatch):
    """Ten segments per sequence: the state scan's groups of four with a tail of two, forward
    (states entering each segment, final state) and reverse (d initial_state)."""
    check_case(monkeypatch, slopes=None, B=2, T=600, H=2, D=16, seg_len=64)


def test_segment_length_rule(monkeypatch):
    """SEG_LEN tokens per segment, halved down to 512 while there are fewer than MIN_PAIRS
    (segment, head) pairs; never below 512 unless SEG_LEN itself is smaller."""
    from attn.linear import kernels
    monkeypatch.setattr(kernels, "SEG_LEN", 2048)
    monkeypatch.setattr(kernels, "MIN_PAIRS", 256)
    assert launch.seg_len(32768, 16) == 2048            # 16 segments x 16 heads
    assert launch.seg_len(16384, 16) == 1024            # 16 x 16 at half the length
    assert launch.seg_len(8192, 16) == 512 and launch.seg_len(1024, 1) == 512
    assert launch.seg_len(1 << 20, 1) == 2048
    monkeypatch.setattr(kernels, "SEG_LEN", 64)     # the tests' short segments stay as they are
    assert launch.seg_len(100, 2) == 64
    lay = launch._Layout(1, 300, 2, [0, 10, 300], "cpu")
    assert lay.seg == 64 and lay.ns == 1 + 5 and lay.doc_seg.tolist() == [0, 1, 6]


@pytest.mark.parametrize("seg", [64, 1024])
def test_documents(monkeypatch, seg):
    """cu_seqlens: uneven lengths incl. 1 and an empty document, one state per document."""
    check_case(monkeypatch, slopes=None, T=130, H=2, D=16, cu=random_docs(130, 5).tolist(),
               seg_len=seg)


@pytest.mark.parametrize("docs", [False, True])
@pytest.mark.parametrize("decay", [False, True])
def test_masked_form_equals_the_recurrence(docs, decay):
    """The compile-time CPU form (documents as a mask, no host values) == the float64
    recurrence: outputs, final states and the gradients of q, k, v and initial_state, with an
    empty and a one-token document (1e-10 relative in float64)."""
    B, T, H, D = (1, 70, 3, 8) if docs else (2, 70, 3, 8)
    cu = torch.tensor([0, 1, 1, 40, 70], dtype=torch.int32) if docs else None
    n = 4 if docs else B
    slopes = torch.rand(H) if decay else None
    q, k, v = (torch.randn(B, T, H, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    init = torch.randn(n, H, D, D, dtype=torch.float64, requires_grad=True)
    do, dfin = torch.randn(B, T, H, D, dtype=torch.float64), torch.randn(n, H, D, D,
                                                                         dtype=torch.float64)
    results = []
    for form in (R.recurrent, R.masked):
        o, fin = form(q, k, v, slopes, initial_state=init, cu_seqlens=cu)
        grads = torch.autograd.grad([o, fin], [q, k, v, init], [do, dfin])
        results.append((o, fin, *grads))
    for name, a, b in zip(("o", "final", "dq", "dk", "dv", "d_init"), *results):
        assert rel(b, a) < 1e-10, (name, rel(b, a))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(monkeypatch, dtype):
    check_case(monkeypatch, slopes=None, T=130, H=2, D=32, dtype=dtype, seg_len=128)


def test_chunks_carrying_state_equal_one_call(monkeypatch):
    monkeypatch.setenv("ATTN_IMPL", "triton")
    monkeypatch.setattr(alloc, "empty", nan_empty)
    assert_chunks_carrying_state_equal_one_call(None, (2, 130, 2, 16), [(0, 64), (64, 65), (65, 130)])


def test_cp_primitives_match_autograd(monkeypatch):
    monkeypatch.setenv("ATTN_IMPL", "triton")
    monkeypatch.setattr(alloc, "empty", nan_empty)
    cu = torch.tensor([0, 30, 31, 90], dtype=torch.int32)
    q, k, v = (torch.randn(1, 90, 2, 16) for _ in range(3))
    init, dfin = torch.randn(3, 2, 16, 16), torch.randn(3, 2, 16, 16)
    do = torch.randn(1, 90, 2, 16)
    o, fin = linear_fwd(q, k, v, init, cu_seqlens=cu)
    grads = linear_bwd(do, q, k, v, init, dfin, cu_seqlens=cu)
    xs = [t.clone().requires_grad_() for t in (q, k, v, init)]
    o2, fin2 = linear_attn(*xs[:3], initial_state=xs[3], output_final_state=True, cu_seqlens=cu)
    g2 = torch.autograd.grad((o2 * do).sum() + (fin2 * dfin).sum(), xs)
    assert rel(o, o2) < 1e-6 and rel(fin, fin2) < 1e-6
    for a, b in zip(grads, g2):
        assert rel(a, b) < 1e-6
    assert op.fwd is linear_fwd and op.bwd is linear_bwd
    grads0 = linear_bwd(do, q, k, v)  # no states: d_initial_state is still returned
    assert grads0[3].shape == (1, 2, 16, 16)


def test_linear_core_has_no_decay():
    assert not LinearCore(64, 2, 2).log_decay().any()


def test_long_sequence_no_drift(monkeypatch):
    """8k tokens, fp32, no decay (the state only grows): no drift from the float64 recurrence."""
    monkeypatch.setenv("ATTN_IMPL", "triton")
    q, k, v = (torch.randn(1, 8192, 1, 16) for _ in range(3))
    o, fin = linear_attn(q, k, v, output_final_state=True)
    o64, fin64 = R.recurrent(q.double(), k.double(), v.double())
    oc, finc = R.chunked(q, k, v)
    assert rel(o, o64) < 2e-5 and rel(fin, fin64) < 2e-5
    assert rel(oc, o64) < 2e-5 and rel(finc, fin64) < 2e-5
    assert rel(o[:, -512:], o64[:, -512:]) < 2e-5


@pytest.mark.parametrize("kw,match", [
    (dict(k=torch.randn(1, 8, 1, 16), v=torch.randn(1, 8, 1, 16)), "one head count"),
    (dict(initial_state=torch.zeros(2, 2, 16, 16)), "initial_state must be a tensor"),
    (dict(cu_seqlens=torch.tensor([0, 8], dtype=torch.int32), q=torch.randn(2, 8, 2, 16),
          k=torch.randn(2, 8, 2, 16), v=torch.randn(2, 8, 2, 16)), "batch size 1"),
    (dict(q=torch.randn(1, 0, 2, 16), k=torch.randn(1, 0, 2, 16), v=torch.randn(1, 0, 2, 16)),
     "must all be >= 1"),
    (dict(v=torch.randn(1, 8, 2, 16, dtype=torch.float16)), "one floating dtype"),
])
def test_bad_input_names_the_argument(monkeypatch, kw, match):
    monkeypatch.setenv("ATTN_IMPL", "triton")
    x = torch.randn(1, 8, 2, 16)
    args = dict(q=x, k=x.clone(), v=x.clone())
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        linear_attn(args.pop("q"), args.pop("k"), args.pop("v"), **args)


@pytest.mark.parametrize("fmap", ["identity", "elu1", "relu"])
def test_core_triton_matches_reference(monkeypatch, fmap):
    core = get_core("linear")(64, 4, 4, feature_map=fmap, norm="full" if fmap == "relu" else "head",
                              gate="silu" if fmap == "identity" else "none")
    assert isinstance(core, LinearCore)
    x = torch.randn(1, 70, 64)
    res = {}
    for impl in ("ref", "triton"):
        monkeypatch.setenv("ATTN_IMPL", impl)
        core.zero_grad()
        y = core(x, None, None)
        y.square().sum().backward()
        res[impl] = (y.detach(), [p.grad.clone() for p in core.parameters()])
    assert rel(res["triton"][0], res["ref"][0]) < 1e-5
    for a, b in zip(res["triton"][1], res["ref"][1]):
        assert rel(a, b) < 1e-4


def test_core_options_are_checked():
    with pytest.raises(ValueError, match="attn.feature_map='softmax'"):
        LinearCore(64, 4, 4, feature_map="softmax")
    with pytest.raises(ValueError, match="attn.norm='layer'"):
        LinearCore(64, 4, 4, norm="layer")
    with pytest.raises(ValueError, match="attn.gate='tanh'"):
        LinearCore(64, 4, 4, gate="tanh")


def test_flops_count():
    core = LinearCore(512, 4, 4)  # D = 128
    assert core.attention_flops_per_token(8192) == 4 * (4 * 128 * 128 + 2 * 64 * 128)
    assert core.attention_flops_per_token(16) == 4 * (4 * 128 * 128 + 2 * 16 * 128)


def test_model_trains(compose, tmp_path):
    import train
    val = train.run(compose("attn=linear", "trainer.steps=6"), tmp_path / "run")
    assert math.isfinite(val)
    rows = [json.loads(l) for l in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0]
