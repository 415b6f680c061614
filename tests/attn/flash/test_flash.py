"""Triton FlashAttention kernels vs the float64 oracle, run on CPU through TRITON_INTERPRET=1
(set by tests/conftest.py) with ATTN_IMPL=triton. Small shapes keep the interpreter fast; the
interpreter's block sizes (32x16 forward / dQ, 16x32 dK/dV) make every shape span several
blocks, and one test swaps them. Tolerances: see flash_testlib.py."""
from __future__ import annotations

import pytest
import torch

from attn import get_core
from attn.common import alloc, launch
from attn.flash import FlashCore, bwd, common, flash_attn, flash_bwd, flash_fwd, fwd, op
from attn.flash.ref import flash_attn_ref
from attn.sdpa import sdpa_attn
from flash_testlib import check_case, nan_empty, random_docs

pytestmark = pytest.mark.skipif(not common.INTERPRET and not torch.cuda.is_available(),
                                reason="needs TRITON_INTERPRET=1 (conftest) or a GPU")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,T,H,D", [(2, 64, 2, 32), (1, 100, 3, 64)])
def test_plain_causal(monkeypatch, dtype, B, T, H, D):
    check_case(monkeypatch, B=B, Tq=T, Hq=H, D=D, dtype=dtype, device=DEV)


@pytest.mark.parametrize("T", [1, 2, 15, 17, 33, 200])
def test_lengths_not_multiple_of_block(monkeypatch, T):
    check_case(monkeypatch, B=2, Tq=T, Hq=2, D=16, device=DEV)


@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gqa(monkeypatch, group, dtype):
    check_case(monkeypatch, B=2, Tq=48, Hq=8, Hkv=8 // group, D=16, dtype=dtype, device=DEV)


@pytest.mark.parametrize("Tq,Tk,q_offset", [(50, 130, 80), (40, 100, 30), (1, 77, 76),
                                            (17, 17, 0), (33, 64, 0)])
def test_q_offset(monkeypatch, Tq, Tk, q_offset):
    check_case(monkeypatch, Tq=Tq, Tk=Tk, q_offset=q_offset, Hq=4, Hkv=2, D=16, device=DEV)


@pytest.mark.parametrize("window", [1, 7, 16, 50, 1000])
def test_window(monkeypatch, window):
    check_case(monkeypatch, B=2, Tq=120, Hq=2, Hkv=1, D=16, window=window, device=DEV)


@pytest.mark.parametrize("cu", [[0, 1, 2, 40, 41, 97, 150], [0, 150], [0, 149, 150],
                                [0, 16, 32, 48, 150], "random"])
def test_documents(monkeypatch, cu):
    cu = random_docs(150, 7) if cu == "random" else cu
    check_case(monkeypatch, Tq=150, Hq=4, Hkv=2, D=16, cu=cu, device=DEV)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_documents_window_offset(monkeypatch, dtype):
    # keys 0..149 in documents; queries are the last 70 positions; window 20
    check_case(monkeypatch, Tq=70, Tk=150, q_offset=80, Hq=4, Hkv=1, D=32, window=20,
               cu=[0, 1, 30, 31, 81, 82, 120, 150], dtype=dtype, device=DEV)


@pytest.mark.parametrize("fwd_blocks,dkdv_blocks,dq_blocks",
                         [((16, 32), (32, 16), (16, 32)), ((64, 16), (16, 64), (64, 16))])
def test_other_block_sizes(monkeypatch, fwd_blocks, dkdv_blocks, dq_blocks):
    if not common.INTERPRET:
        pytest.skip("interpreter block sizes only")
    for table, (bm, bn) in ((fwd.INTERP_BLOCKS, fwd_blocks), (bwd.INTERP_DKDV, dkdv_blocks),
                            (bwd.INTERP_DQ, dq_blocks)):
        monkeypatch.setitem(table, "BLOCK_M", bm)
        monkeypatch.setitem(table, "BLOCK_N", bn)
    check_case(monkeypatch, Tq=90, Tk=130, q_offset=37, Hq=2, Hkv=1, D=16, window=25,
               cu=[0, 5, 6, 64, 100, 130], device=DEV)
    check_case(monkeypatch, Tq=75, Hq=2, D=16, device=DEV)


def test_primitives_match_autograd_and_are_deterministic(monkeypatch):
    monkeypatch.setenv("ATTN_IMPL", "triton")
    monkeypatch.setattr(alloc, "empty", nan_empty)
    cu = torch.tensor([0, 9, 10, 77, 96], dtype=torch.int32, device=DEV)
    q, k, v = (torch.randn(1, 96, h, 32, device=DEV) for h in (4, 2, 2))
    kw = dict(cu_seqlens=cu, q_offset=0, window=40, scale=0.3)
    o, lse = flash_fwd(q, k, v, **kw)
    do = torch.randn_like(o)
    g1 = flash_bwd(do, q, k, v, o, lse, **kw)
    g2 = flash_bwd(do, q, k, v, o, lse, **kw)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o2, lse2 = flash_attn(*leaves, return_lse=True, **kw)
    g3 = torch.autograd.grad(o2, leaves, do)
    assert torch.equal(o, o2) and torch.equal(lse, lse2)
    for a, b, c in zip(g1, g2, g3):
        assert torch.equal(a, b) and torch.equal(a, c)  # bitwise: no atomics
    # the ref primitives agree with the Triton ones
    monkeypatch.setenv("ATTN_IMPL", "ref")
    o_r, lse_r = flash_fwd(q, k, v, **kw)
    g_r = flash_bwd(do, q, k, v, o_r, lse_r, **kw)
    torch.testing.assert_close(o, o_r, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse, lse_r, rtol=1e-5, atol=1e-5)
    for a, b in zip(g1, g_r):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["split", "fused"])
def test_bwd_given_delta_and_dq_accumulator(monkeypatch, mode):
    """flash_bwd(delta=, dq=): the caller's delta replaces the preprocess, and dQ is added to the
    given tensor (one rounding) and returned; dK, dV as without the options."""
    monkeypatch.setenv("ATTN_IMPL", "triton")
    monkeypatch.setenv("FLASH_BWD", mode)
    monkeypatch.setattr(alloc, "empty", nan_empty)
    cu = torch.tensor([0, 30, 31, 70], dtype=torch.int32, device=DEV)
    q, k, v = (torch.randn(1, 70, h, 32, device=DEV) for h in (4, 2, 2))
    kw = dict(cu_seqlens=cu, window=25, scale=0.3)
    o, lse = flash_fwd(q, k, v, **kw)
    do = torch.randn_like(o)
    dq0, dk0, dv0 = flash_bwd(do, q, k, v, o, lse, **kw)
    delta = (o * do).sum(-1).transpose(1, 2).contiguous()       # [B, Hq, Tq]
    base = torch.randn_like(q)
    acc = base.clone()
    dq, dk, dv = flash_bwd(do, q, k, v, o, lse, **kw, delta=delta, dq=acc)
    assert dq is acc
    torch.testing.assert_close(dq, base + dq0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dk, dk0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dv, dv0, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="delta must be a contiguous"):
        flash_bwd(do, q, k, v, o, lse, **kw, delta=delta[:, :2])


def test_ref_matches_sdpa_definition():
    """The oracle agrees with the lead's SDPA op (float64) on documents, offsets and windows."""
    q, k, v = (torch.randn(1, 60, 2, 16, dtype=torch.float64) for _ in range(3))
    cu = torch.tensor([0, 1, 25, 60], dtype=torch.int32)
    for kw in (dict(), dict(cu_seqlens=cu), dict(window=9), dict(cu_seqlens=cu, window=5)):
        torch.testing.assert_close(flash_attn_ref(q, k, v, **kw)[0], sdpa_attn(q, k, v, **kw))
    torch.testing.assert_close(flash_attn_ref(q[:, 40:], k, v, q_offset=40)[0],
                               sdpa_attn(q, k, v)[:, 40:])


def test_dispatch(monkeypatch):
    q, k, v = (torch.randn(1, 20, 2, 16) for _ in range(3))
    calls = []
    real = fwd.fwd_triton
    monkeypatch.setattr(fwd, "fwd_triton", lambda *a: calls.append(1) or real(*a))
    monkeypatch.delenv("ATTN_IMPL", raising=False)
    flash_attn(q, k, v)  # CPU tensors: ref.py
    assert calls == []
    monkeypatch.setenv("ATTN_IMPL", "triton")
    flash_attn(q, k, v)
    assert calls == [1]
    monkeypatch.setenv("ATTN_IMPL", "cuda")
    with pytest.raises(ValueError, match="ATTN_IMPL"):
        flash_attn(q, k, v)


def test_core_registry_and_layer(monkeypatch):
    assert get_core("flash") is FlashCore and FlashCore.family == "flash"
    layer = FlashCore(dim=64, n_heads=4, n_kv_heads=2)
    x = torch.randn(2, 40, 64)
    cu = torch.tensor([0, 13, 40, 41, 80], dtype=torch.int32)
    for c in (None, cu):
        monkeypatch.setenv("ATTN_IMPL", "ref")
        y_ref = layer(x, cu_seqlens=c)
        monkeypatch.setenv("ATTN_IMPL", "triton")
        y = layer(x, cu_seqlens=c)
        torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
        y.sum().backward()  # the Triton backward runs inside a layer


def _bad_inputs():
    f = torch.randn
    q, k = f(1, 8, 4, 16), f(1, 8, 2, 16)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    return [
        ("q", dict(q=f(8, 4, 16), k=k, v=k)),
        ("same shape", dict(q=q, k=k, v=f(1, 8, 2, 32))),
        ("head dim", dict(q=f(1, 8, 4, 32), k=k, v=k)),
        ("GQA", dict(q=f(1, 8, 3, 16), k=k, v=k)),
        ("dtype", dict(q=q.half(), k=k, v=k)),
        ("dtype", dict(q=q.double(), k=k.double(), v=k.double())),
        ("D=24", dict(q=f(1, 8, 4, 24), k=f(1, 8, 2, 24), v=f(1, 8, 2, 24))),
        ("D=512", dict(q=f(1, 8, 4, 512), k=f(1, 8, 2, 512), v=f(1, 8, 2, 512))),
        ("contiguous", dict(q=f(1, 4, 8, 16).transpose(1, 2), k=k, v=k)),
        ("batch size 1", dict(q=f(2, 8, 4, 16), k=f(2, 8, 2, 16), v=f(2, 8, 2, 16),
                              cu_seqlens=cu)),
        ("int32", dict(q=q, k=k, v=k, cu_seqlens=cu.long())),
        ("end at T", dict(q=q, k=k, v=k, cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32))),
        ("non-decreasing", dict(q=q, k=k, v=k,
                                cu_seqlens=torch.tensor([0, 5, 3, 8], dtype=torch.int32))),
        ("q_offset", dict(q=q, k=k, v=k, q_offset=1)),
        ("q_offset", dict(q=q, k=k, v=k, q_offset=-1)),
        ("window", dict(q=q, k=k, v=k, window=0)),
    ]


@pytest.mark.parametrize("rule,kwargs", _bad_inputs())
def test_bad_inputs_raise(monkeypatch, rule, kwargs):
    monkeypatch.setenv("ATTN_IMPL", "triton")
    with pytest.raises(ValueError, match=rule):
        flash_attn(**kwargs)


def test_bad_bwd_inputs(monkeypatch):
    monkeypatch.setenv("ATTN_IMPL", "triton")
    q, k = torch.randn(1, 8, 4, 16), torch.randn(1, 8, 2, 16)
    o, lse = flash_fwd(q, k, k)
    with pytest.raises(ValueError, match="lse"):
        flash_bwd(o, q, k, k, o, lse[:, :2])
    with pytest.raises(ValueError, match="lse must be float32"):
        flash_bwd(o, q, k, k, o, lse.double())


def test_impl_needs_interpreter_or_cuda(monkeypatch):
    monkeypatch.setenv("ATTN_IMPL", "triton")
    import attn.dispatch
    monkeypatch.setattr(attn.dispatch, "INTERPRET", False)
    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    with pytest.raises(ValueError, match="CUDA"):
        op._impl(torch.randn(1))


@pytest.mark.parametrize("case", [dict(Tq=90, Tk=130, q_offset=37, Hq=4, Hkv=2, window=25,
                                       cu=[0, 5, 6, 64, 100, 130]),
                                  dict(B=2, Tq=75, Hq=2, dtype=torch.bfloat16)])
def test_fused_backward(monkeypatch, case):
    """FLASH_BWD=fused: dK/dV and dQ programs in one launch give the same results."""
    monkeypatch.setenv("FLASH_BWD", "fused")
    check_case(monkeypatch, D=16, device=DEV, **case)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 5e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("Tq,Tk,Hq,Hkv", [(40, 100, 4, 2), (77, 33, 2, 2), (1, 50, 4, 1)])
def test_primitives_non_causal(monkeypatch, dtype, tol, Tq, Tk, Hq, Hkv):
    """causal=False (ring attention's off-diagonal blocks): every query sees every key; the
    inputs may be non-contiguous slices (copied)."""
    monkeypatch.setenv("ATTN_IMPL", "triton")
    monkeypatch.setattr(alloc, "empty", nan_empty)
    B = 2
    q = torch.randn(B, 2 * Tq, Hq, 32, device=DEV).to(dtype)[:, Tq:]  # non-contiguous slice
    k, v = (torch.randn(B, Tk, Hkv, 32, device=DEV).to(dtype) for _ in range(2))
    o, lse = flash_fwd(q, k, v, causal=False)
    do = torch.randn_like(o)
    grads = flash_bwd(do, q, k, v, o, lse, causal=False)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    o64, lse64 = flash_attn_ref(*leaves, causal=False)
    g64 = torch.autograd.grad(o64, leaves, do.double())
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(o, o64) < tol and rel(lse, lse64) < 1e-5
    for g, e in zip(grads, g64):
        assert torch.isfinite(g).all() and rel(g, e) < tol
    with pytest.raises(ValueError, match="causal=False"):
        flash_fwd(q, k, v, causal=False, window=4)


@pytest.mark.parametrize("case", [dict(B=2, Tq=50, Hq=4, Hkv=2, D=16),
                                  dict(B=1, Tq=40, Tk=72, q_offset=32, Hq=2, D=32, window=24)])
def test_pointer_loads_without_tma(monkeypatch, case):
    """The backward's pointer-load path (pre-Hopper GPUs, FLASH_TMA=0, unaligned tensors): the
    other tests run the TMA descriptor path, which the interpreter executes as well."""
    monkeypatch.setitem(launch.TMA, "dkdv", False)
    monkeypatch.setitem(launch.TMA, "dq", False)
    check_case(monkeypatch, **case, device=DEV)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("case", [dict(B=2, T=70, Hq=4, Hkv=2),
                                  dict(B=1, T=90, Hq=2, Hkv=1, cu=[0, 1, 40, 90]),
                                  dict(B=1, T=64, Tk=100, q_offset=36, Hq=2, Hkv=2, window=30)],
                         ids=["gqa", "documents", "offset-window"])
@pytest.mark.parametrize("use_o", [True, False], ids=["o-and-lse", "lse-only"])
def test_lse_is_differentiable(monkeypatch, dtype, tol, case, use_o):
    """return_lse=True: a loss on lse (alone or with o) back-propagates as through
    torch.logsumexp; gradients against float64 autograd of ref.py (fresh inputs, outputs
    poisoned). Tolerance: relative norm 2e-5 fp32, 1e-2 bf16."""
    from flash_testlib import rel
    monkeypatch.setattr(alloc, "empty", nan_empty)
    monkeypatch.setenv("ATTN_IMPL", "triton")
    B, T, Hq, Hkv, D = case["B"], case["T"], case["Hq"], case["Hkv"], 16
    Tk = case.get("Tk", T)
    kw = dict(q_offset=case.get("q_offset", 0), window=case.get("window"),
              cu_seqlens=None if "cu" not in case else torch.tensor(case["cu"], dtype=torch.int32))
    q, k, v = (torch.randn(B, n, h, D) for n, h in ((T, Hq), (Tk, Hkv), (Tk, Hkv)))
    w_o, w_lse = torch.randn(B, T, Hq, D), torch.randn(B, Hq, T)

    def grads(fn, dt):
        leaves = [t.to(dt).requires_grad_() for t in (q, k, v)]
        o, lse = fn(*leaves)
        loss = (lse.double() * w_lse.double()).sum()
        if use_o:
            loss = loss + (o.double() * w_o.double()).sum()
        out = torch.autograd.grad(loss, leaves, allow_unused=True)  # lse alone: no dv
        return [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, out)]

    got = grads(lambda a, b, c: flash_attn(a, b, c, return_lse=True, **kw), dtype)
    exact = grads(lambda a, b, c: flash_attn_ref(a, b, c, **kw), torch.float64)
    for name, g, e in zip(("dq", "dk", "dv"), got, exact):
        assert torch.isfinite(g).all(), name
        assert rel(g, e) <= tol, (name, rel(g, e))


AHEAD_CASES = {  # every key range kind: masked / unmasked / masked, documents, window, offsets
    "plain": dict(B=2, Tq=77, Hq=2, D=16),
    "gqa_bf16": dict(B=1, Tq=64, Hq=4, Hkv=2, D=32, dtype=torch.bfloat16),
    "docs": dict(B=1, Tq=96, Hq=2, D=16, cu=[0, 1, 40, 41, 96]),
    "window_offset": dict(B=1, Tq=40, Tk=90, Hq=2, D=16, q_offset=50, window=24),
    "one_key_block": dict(B=1, Tq=9, Hq=1, D=16),
}


@pytest.mark.parametrize("case", list(AHEAD_CASES))
def test_scores_ahead_forward_matches_the_reference_and_the_plain_loop(monkeypatch, case):
    """FLASH_FWD_AHEAD (fwd.py _fwd_inner_ahead: q·k^T issued one chunk before its softmax):
    output, lse and gradients against the float64 oracle by the usual rules, and the forward
    equal to the plain loop's: the same operations in the same order."""
    kw = dict(AHEAD_CASES[case])
    monkeypatch.setattr(common, "FWD_AHEAD", True)
    check_case(monkeypatch, **kw, device=DEV)
    g = torch.Generator().manual_seed(len(case))
    B, Tq, Hq, D = kw["B"], kw["Tq"], kw["Hq"], kw["D"]
    Tk, Hkv, dt = kw.get("Tk", Tq), kw.get("Hkv", Hq), kw.get("dtype", torch.float32)
    q = torch.randn(B, Tq, Hq, D, generator=g).to(DEV, dt)
    k, v = (torch.randn(B, Tk, Hkv, D, generator=g).to(DEV, dt) for _ in range(2))
    cu = None if "cu" not in kw else torch.tensor(kw["cu"], dtype=torch.int32, device=DEV)
    args = dict(cu_seqlens=cu, q_offset=kw.get("q_offset", 0), window=kw.get("window"))
    monkeypatch.setenv("ATTN_IMPL", "triton")
    ahead = flash_fwd(q, k, v, **args)
    monkeypatch.setattr(common, "FWD_AHEAD", False)
    plain = flash_fwd(q, k, v, **args)
    assert torch.equal(ahead[0], plain[0]) and torch.equal(ahead[1], plain[1])
