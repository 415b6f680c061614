"""NSA end to end through the Triton path (compressed attention, on-chip selection, selected
blocks, window via flash, fused gate mix) against the dense definition ref.py, under the Triton
interpreter (ATTN_IMPL=triton): output and the gradients of q, k, v, k_cmp, v_cmp and the three
gates (two with window = 0: no window branch); GQA group sizes 1, 3, 4, 16; documents (uneven,
one of length 1); q_offset shards; short sequences with fewer blocks than topk (and none
compressed); bf16.

Error measure: relative norm ||x − x64|| / ||x64|| (floored at an rms of 0.05) against ref.py in
float64. fp32: kernel error <= max(4 · ref.py's own fp32 error, 2e-5); bf16: <= 2 · ref.py's
bf16 error + 2e-3 and < 2e-2. Selection is discrete: inputs whose float64 selection scores have
a near-tie at the top-n boundary (relative gap < 1e-4) are redrawn, so rounding cannot flip a
block. Outputs of every kernel are NaN-poisoned (unwritten elements fail)."""
from __future__ import annotations

import pytest
import torch

from attn.common import alloc
from attn.nsa import nsa_attn
from attn.nsa.gate_mix import gate_mix_bwd
from attn.nsa.op import compress
from attn.nsa.ref import (_doc_starts, _masked_softmax, cmp_block_starts, cmp_cu_seqlens,
                          nsa_attn_ref, selection_scores)

bf16 = torch.bfloat16


def poisoned(shape, dtype, device):
    return torch.full(shape, -7 if dtype == torch.int32 else float("nan"), dtype=dtype,
                      device=device)


def rel(a, b):
    if b.numel() == 0:                                 # no compressed block at all
        return 0.0 if a.shape == b.shape else float("inf")
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(0.05 * b.numel() ** 0.5)).item()


def docs(total, n):
    cuts = torch.randperm(total - 1)[: max(n - 2, 0)] + 1
    cuts = torch.cat([cuts, torch.tensor([1])]).unique().sort().values
    return torch.cat([torch.tensor([0]), cuts, torch.tensor([total])]).to(torch.int32)


def min_gap(q, kc, T, kw, cu, off):
    """Smallest relative gap between the topk-th and the next finite float64 selection score."""
    hq, hkv, d = q.shape[2], kc.shape[2], q.shape[3]
    kstart = _doc_starts(cu, T, "cpu")
    qpos = torch.arange(q.shape[1]) + off
    cstart, cdoc = cmp_block_starts(T, kw["cmp_block"], kw["cmp_stride"], cu, "cpu",
                                    rows=kc.shape[1])
    cmask = (cdoc[None, :] == kstart[qpos][:, None]) \
        & (cstart[None, :] + kw["cmp_block"] - 1 <= qpos[:, None])
    kd = kc.double().transpose(1, 2).repeat_interleave(hq // hkv, 1)
    p = _masked_softmax((q.double().transpose(1, 2) @ kd.transpose(-1, -2)) * d ** -0.5, cmask)
    score, _ = selection_scores(p, T, cmp_block=kw["cmp_block"], cmp_stride=kw["cmp_stride"],
                                sel_block=kw["sel_block"], cu_seqlens=cu, q_offset=off, hkv=hkv)
    v = score.sort(-1, descending=True).values
    n = kw["topk"]
    if v.shape[-1] <= n:
        return float("inf")
    a, b = v[..., n - 1], v[..., n]
    ok = torch.isfinite(a) & torch.isfinite(b)
    return float(((a - b) / a.abs().clamp_min(1e-30))[ok].min()) if ok.any() else float("inf")


def draw_gates(B, tq, hq, kind):
    """unit: in [0, 1) (the folded backward); signed: in [-1, 1) (the gated-dO backward);
    zeros: unit with a quarter exactly 0 (folded, lse + inf)."""
    g = torch.rand(3, B, tq, hq)
    if kind == "signed":
        return 2 * g - 1
    if kind == "zeros":
        return torch.where(torch.rand_like(g) < 0.25, torch.zeros_like(g), g)
    return g


def make(B, T, hq, hkv, d, dtype, kw, cu, off, gates="unit"):
    for _ in range(10):
        tq = T - off
        q = torch.randn(B, tq, hq, d)
        k, v = torch.randn(B, T, hkv, d), torch.randn(B, T, hkv, d)
        kc, vc = compress(k, v, kw["cmp_block"], kw["cmp_stride"], cu_seqlens=cu)
        kc, vc = kc + 0.5 * torch.randn_like(kc), vc + 0.5 * torch.randn_like(vc)
        if min_gap(q, kc.to(dtype), T, kw, cu, off) > 1e-4:
            gates = draw_gates(B, tq, hq, gates)
            if kw["window"] == 0:                       # no window branch: g_swa None
                return [t.to(dtype) for t in (q, k, v, kc, vc, *gates[:2])] + [None]
            return [t.to(dtype) for t in (q, k, v, kc, vc, *gates)]
    raise AssertionError("could not draw inputs without a near-tie in the selection")


CASES = [
    dict(T=100, hq=4, hkv=2, kw=dict(cmp_block=4, cmp_stride=2, sel_block=8, topk=4, window=6)),
    dict(B=2, T=90, hq=3, hkv=1, kw=dict(cmp_block=8, cmp_stride=4, sel_block=16, topk=3,
                                         window=20)),
    dict(T=130, hq=4, hkv=1, cu=5, kw=dict(cmp_block=4, cmp_stride=2, sel_block=8, topk=5,
                                           window=9)),
    dict(T=140, hq=2, hkv=2, cu=4, off=60, kw=dict(cmp_block=4, cmp_stride=2, sel_block=8,
                                                   topk=4, window=16)),
    dict(T=150, hq=16, hkv=1, kw=dict(cmp_block=32, cmp_stride=16, sel_block=64, topk=3,
                                      window=40)),
    dict(T=7, hq=2, hkv=1, kw=dict(cmp_block=8, cmp_stride=4, sel_block=4, topk=16,
                                   window=512)),                      # nothing compressed
    dict(T=96, hq=4, hkv=2, cu=3, dtype=bf16, kw=dict(cmp_block=8, cmp_stride=4, sel_block=16,
                                                      topk=3, window=24)),
    dict(T=80, hq=4, hkv=2, gates="signed", kw=dict(cmp_block=4, cmp_stride=2, sel_block=8,
                                                    topk=4, window=10)),
    dict(T=80, hq=4, hkv=1, cu=3, gates="zeros", dtype=bf16,
         kw=dict(cmp_block=4, cmp_stride=2, sel_block=8, topk=4, window=10)),
    # window = 0: the compressed and selected branches only (fla's two-branch NSA)
    dict(T=100, hq=4, hkv=2, kw=dict(cmp_block=4, cmp_stride=2, sel_block=8, topk=4, window=0)),
    dict(T=140, hq=2, hkv=1, cu=4, off=60, gates="signed",
         kw=dict(cmp_block=4, cmp_stride=2, sel_block=8, topk=4, window=0)),
    dict(T=96, hq=4, hkv=2, cu=3, dtype=bf16, gates="zeros",
         kw=dict(cmp_block=8, cmp_stride=4, sel_block=16, topk=3, window=0)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(
    f"{k}{v}" for k, v in c.items() if k != "kw").replace("torch.", ""))
def test_nsa_matches_ref(monkeypatch, case):
    monkeypatch.setattr(alloc, "empty", poisoned)
    B, T, hq, hkv, kw = case.get("B", 1), case["T"], case["hq"], case["hkv"], case["kw"]
    dtype, off, d = case.get("dtype", torch.float32), case.get("off", 0), 16
    cu = docs(T, case["cu"]) if "cu" in case else None
    inputs = make(B, T, hq, hkv, d, dtype, kw, cu, off, case.get("gates", "unit"))
    do = torch.randn(B, T - off, hq, d).to(dtype)

    def run(impl, ts):
        monkeypatch.setenv("ATTN_IMPL", impl)
        ts = [t.detach().clone().requires_grad_(True) for t in ts if t is not None]
        fn = nsa_attn if impl == "triton" else nsa_attn_ref
        o = fn(*ts, *[None] * (8 - len(ts)), **kw, cu_seqlens=cu, q_offset=off)  # g_swa None
        o.backward(do.to(o.dtype))
        return [o.detach()] + [t.grad for t in ts]

    got = run("triton", inputs)
    ref = run("ref", inputs)
    exact = run("ref", [None if t is None else t.double() for t in inputs])
    assert len(got) == (9 if kw["window"] else 8)    # o and every gradient, dg_swa if any
    names = ["o", "dq", "dk", "dv", "dk_cmp", "dv_cmp", "dg_cmp", "dg_slc", "dg_swa"]
    for name, a, r, x in zip(names, got, ref, exact):
        assert not torch.isnan(a).any(), name
        ea, er = rel(a, x), rel(r, x)
        if dtype == torch.float32:
            assert ea <= max(4 * er, 2e-5), (name, ea, er)
        else:
            assert ea <= 2 * er + 2e-3 and ea < 2e-2, (name, ea, er)


@pytest.mark.parametrize("case", [CASES[i] for i in (3, 4, 8, 10)], ids=lambda c: "-".join(
    f"{k}{v}" for k, v in c.items() if k != "kw").replace("torch.", ""))
def test_mix_in_selected_branch_epilogue(monkeypatch, case):
    """The layer's output, which the selected branch's epilogue writes (gate_mix.mix_rows), is
    the gated sum of the three (two with window = 0) branch outputs it returns, in fp32 and
    rounded once: against torch's fp32 sum of those outputs within one rounding of the output
    dtype (fp32: 1e-6 relative, FMA against separate products; bf16: 2^-8 relative, one ulp).
    Cases: documents and q_offset, bf16 with zero gates, 16 heads per group with the coarse and
    the fine tiling each (both launches write o), no window branch."""
    from attn.nsa import slc
    from attn.nsa.op import _nsa_fwd_body
    monkeypatch.setattr(alloc, "empty", poisoned)
    B, T, hq, hkv, kw = case.get("B", 1), case["T"], case["hq"], case["hkv"], case["kw"]
    dtype, off = case.get("dtype", torch.float32), case.get("off", 0)
    cu = docs(T, case["cu"]) if "cu" in case else None
    q, k, v, kc, vc, *g = make(B, T, hq, hkv, 16, dtype, kw, cu, off, case.get("gates", "unit"))
    gates = torch.stack([t for t in g if t is not None], dim=-1)
    args = (kw["cmp_block"], kw["cmp_stride"], kw["sel_block"], kw["topk"], kw["window"], cu, off)
    for tiles in ("coarse", "fine") if hq // hkv == 16 else ("adaptive",):
        monkeypatch.setattr(slc, "TILES", tiles)
        o, o_cmp, _, o_slc, _, o_swa, _, _ = _nsa_fwd_body(q, k, v, kc, vc, gates, 16 ** -0.5,
                                                           *args, None)
        branches = [o_cmp, o_slc] + ([o_swa] if kw["window"] else [])
        want = sum(gates[..., i, None].float() * t.float() for i, t in enumerate(branches))
        assert not torch.isnan(o).any()
        tol = 1e-6 if dtype == torch.float32 else 2 ** -8
        assert torch.allclose(o.float(), want.to(dtype).float(), rtol=tol, atol=tol), tiles


def test_gate_mix_bwd_matches_torch(monkeypatch):
    """gate_mix_bwd (the gated-dO backward: signed gates) against autograd of torch's sum:
    do_i = g_i·do and dgates, and the branch deltas rowsum(do_i · o_i), [3, B, H, T], from the
    do_i it returns."""
    monkeypatch.setattr(alloc, "empty", poisoned)
    os_ = [torch.randn(2, 5, 3, 16, dtype=torch.float64).float().requires_grad_() for _ in range(3)]
    g = (2 * torch.rand(2, 5, 3, 3) - 1).requires_grad_()
    want = sum(g[..., i, None] * os_[i] for i in range(3))
    do = torch.randn_like(want)
    grads = torch.autograd.grad(want, [*os_, g], do)
    deltas = poisoned((3, 2, 3, 5), torch.float32, "cpu")
    *dos, dg = gate_mix_bwd(do, *(t.detach() for t in os_), g.detach(), deltas=deltas)
    for a, b in zip([*dos, dg], grads):
        assert torch.allclose(a, b, atol=1e-5)
    for i in range(3):
        want = (dos[i] * os_[i].detach()).sum(-1).transpose(1, 2)
        assert torch.allclose(deltas[i], want, atol=1e-5), i
    with pytest.raises(ValueError, match="deltas"):
        gate_mix_bwd(do, *(t.detach() for t in os_), g.detach(), deltas=deltas[:, :1])


def test_padded_and_exact_compressed_layouts_agree(monkeypatch):
    """With documents k_cmp may come exact (the documents' blocks only) or padded to the
    no-document count (compress's form: no host read). The Triton path gives the same output and
    gradients for both; the padded rows get a zero gradient, whatever they hold."""
    monkeypatch.setattr(alloc, "empty", poisoned)
    monkeypatch.setenv("ATTN_IMPL", "triton")
    kw = dict(cmp_block=4, cmp_stride=2, sel_block=8, topk=5, window=9)
    T, cu = 130, docs(130, 5)
    q, k, v, kc, vc, *gates = make(1, T, 4, 1, 16, torch.float32, kw, cu, 0)
    n = int(cmp_cu_seqlens(cu, kw["cmp_block"], kw["cmp_stride"])[-1])
    assert kc.shape[1] == (T - 4) // 2 + 1 > n                    # padded, with unused rows
    do = torch.randn_like(q)

    def run(kc, vc):
        ts = [t.detach().clone().requires_grad_(True) for t in (q, k, v, kc, vc, *gates)]
        o = nsa_attn(*ts, **kw, cu_seqlens=cu)
        o.backward(do)
        return [o.detach()] + [t.grad for t in ts]

    padded, exact = run(kc, vc), run(kc[:, :n], vc[:, :n])
    for i, (a, b) in enumerate(zip(padded, exact)):
        if i in (4, 5):                                             # dk_cmp, dv_cmp
            assert torch.equal(a[:, n:], torch.zeros_like(a[:, n:]))
            a = a[:, :n]
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), i


def test_gate_mix_bwd_two_branches(monkeypatch):
    """Without the window branch (o_swa None, gates [.., 2]): gradients and the two branch
    deltas against torch; a gates / o_swa mismatch is refused."""
    monkeypatch.setattr(alloc, "empty", poisoned)
    os_ = [torch.randn(2, 5, 3, 16).requires_grad_() for _ in range(2)]
    g = torch.rand(2, 5, 3, 2).requires_grad_()
    want = g[..., 0, None] * os_[0] + g[..., 1, None] * os_[1]
    do = torch.randn_like(want)
    grads = torch.autograd.grad(want, [*os_, g], do)
    deltas = poisoned((2, 2, 3, 5), torch.float32, "cpu")
    do1, do2, do3, dg = gate_mix_bwd(do, *(t.detach() for t in os_), None, g.detach(),
                                     deltas=deltas)
    assert do3 is None
    for a, b in zip([do1, do2, dg], grads):
        assert torch.allclose(a, b, atol=1e-5)
    for i, do_i in enumerate((do1, do2)):
        want = (do_i * os_[i].detach()).sum(-1).transpose(1, 2)
        assert torch.allclose(deltas[i], want, atol=1e-5), i
    os_ = [t.detach() for t in os_]
    with pytest.raises(ValueError, match="gates"):
        gate_mix_bwd(do, *os_, None, torch.rand(2, 5, 3, 3))
    with pytest.raises(ValueError, match="gates"):
        gate_mix_bwd(do, *os_, os_[0], g.detach())


def test_window_and_g_swa_must_agree():
    """window >= 1 needs g_swa, window = 0 takes none: one message naming both, on both paths."""
    q = torch.randn(1, 40, 2, 16)
    k = v = torch.randn(1, 40, 1, 16)
    kc, vc = compress(k, v, 4, 2)
    g = torch.rand(1, 40, 2)
    kw = dict(cmp_block=4, cmp_stride=2, sel_block=8, topk=4)
    with pytest.raises(ValueError, match="window=0 with g_swa given"):
        nsa_attn(q, k, v, kc, vc, g, g, g, **kw, window=0)
    with pytest.raises(ValueError, match="window=16 with g_swa None"):
        nsa_attn(q, k, v, kc, vc, g, g, None, **kw, window=16)
    with pytest.raises(ValueError, match="window=-1 must be >= 1, or 0"):
        nsa_attn(q, k, v, kc, vc, g, g, None, **kw, window=-1)
    with pytest.raises(ValueError, match="g_swa is given exactly when window >= 1"):
        nsa_attn_ref(q, k, v, kc, vc, g, g, g, **kw, window=0)
