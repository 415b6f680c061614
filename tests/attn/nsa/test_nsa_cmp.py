"""NSA compressed-branch Triton kernels (attn/nsa/cmp.py) against the definition
(attn/nsa/ref.py: cmp_attn_ref) computed in float64 from the same inputs: output, lse and the
gradients dq, dk_cmp, dv_cmp for a random upstream gradient. On CPU the kernels run in the
Triton interpreter (conftest sets TRITON_INTERPRET=1) at small shapes; the `gpu` tests repeat
the check at T = 4096, D = 128 in bf16 (float32 oracle there) and check that the backward is
bit-for-bit deterministic at T = 16k.

Outputs are poisoned (attn.common.alloc.empty returns NaN-filled tensors), so an element the
kernels fail to write shows up as NaN.

Error measure: relative norm ||x - x_exact|| / ||x_exact|| (denominator floored at an rms of
0.05, so all-zero gradients of unseen compressed rows compare absolutely).
Rules: fp32 inputs: error <= 1e-5; bf16 / fp16 inputs: error <= 2 * (error of cmp_attn_ref run
in the input dtype, i.e. fp32 math rounded to the input dtype) + 1e-4, and < 1e-2.
lse: +inf exactly where the definition has +inf (rows that see no compressed row, whose o and dq
must be exactly 0); elsewhere |lse - lse_exact| <= 1e-5 * (1 + |lse_exact|) for fp32 and
2 * ref error + 1e-4 for 16-bit inputs.
"""
from __future__ import annotations

import pytest
import torch

from attn.common import alloc
from attn.nsa.cmp import cmp_attn, cmp_attn_bwd, cmp_attn_fwd
from attn.nsa.ref import cmp_attn_ref, cmp_cu_seqlens, num_cmp_blocks

bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32


def nan_empty(shape, dtype, device):
    """Poisoned outputs: every element the kernels fail to write stays NaN."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(0.05 * max(b.numel(), 1) ** 0.5)).item()


def random_docs(total, n_docs):
    """Uneven document lengths summing to `total`, with at least one document of length 1."""
    cuts = torch.randperm(total - 1)[: max(n_docs - 2, 0)] + 1
    cuts = torch.cat([cuts, torch.tensor([1])]).unique().sort().values
    return torch.cat([torch.tensor([0]), cuts, torch.tensor([total])]).to(torch.int32)


def check_case(monkeypatch, *, B=1, tk=96, tq=None, q_offset=0, hq=2, hkv=None, d=16, cb=4,
               stride=2, dtype=fp32, cu=None, device="cpu", exact=torch.float64):
    """Run cmp_attn and its backward; compare with cmp_attn_ref in `exact` and in `dtype`."""
    monkeypatch.setattr(alloc, "empty", nan_empty)
    tq = tk - q_offset if tq is None else tq
    hkv = hq if hkv is None else hkv
    cu_t = None if cu is None else torch.as_tensor(cu, dtype=torch.int32, device=device)
    tc = (num_cmp_blocks(tk, cb, stride) if cu_t is None
          else int(cmp_cu_seqlens(cu_t, cb, stride)[-1]))
    q = torch.randn(B, tq, hq, d, device=device).to(dtype)
    kc = torch.randn(B, tc, hkv, d, device=device).to(dtype)
    vc = torch.randn(B, tc, hkv, d, device=device).to(dtype)
    do = torch.randn(B, tq, hq, d, device=device).to(dtype)
    kw = dict(cmp_block=cb, cmp_stride=stride, cu_seqlens=cu_t, q_offset=q_offset, tk=tk)

    def run(fn, dt):
        leaves = [t.detach().to(dt).requires_grad_() for t in (q, kc, vc)]
        o, lse = fn(*leaves, **kw)
        return (o, lse, *torch.autograd.grad(o, leaves, do.to(dt)))

    got = run(cmp_attn, dtype)
    ref = run(cmp_attn_ref, dtype)
    ex = run(cmp_attn_ref, exact)
    report = {}
    for name, g, r, x in zip(["o", "lse", "dq", "dk", "dv"], got, ref, ex):
        assert g.shape == x.shape, (name, g.shape, x.shape)
        assert g.dtype == (fp32 if name == "lse" else dtype), (name, g.dtype)
        if name == "lse":
            assert not torch.isnan(g).any(), "lse: NaN (unwritten elements)"
            empty = torch.isinf(x)
            assert torch.equal(torch.isinf(g), empty) and (g[empty] > 0).all(), \
                "lse must be +inf exactly on rows that see no compressed row"
            e_k = (g - x).abs().masked_fill(empty, 0).div(1 + x.abs().masked_fill(empty, 0))
            e_r = (r - x).abs().masked_fill(empty, 0).div(1 + x.abs().masked_fill(empty, 0))
            e_k, e_r = e_k.max().item() if e_k.numel() else 0.0, \
                e_r.max().item() if e_r.numel() else 0.0
        else:
            assert torch.isfinite(g).all(), f"{name}: NaN/inf (unwritten or broken elements)"
            e_k, e_r = rel(g, x), rel(r, x)
        report[name] = (e_k, e_r)
        if dtype == fp32:
            assert e_k <= 1e-5, (name, e_k)
        else:
            assert e_k < 1e-2, (name, e_k)
            assert e_k <= 2 * e_r + 1e-4, (name, "kernel", e_k, "ref in dtype", e_r)
    empty_rows = torch.isinf(ex[1]).transpose(1, 2)                  # [B, Tq, Hq]
    assert (got[0][empty_rows] == 0).all() and (got[2][empty_rows] == 0).all()
    return report, got


# ---- CPU (interpreter) cases

@pytest.mark.parametrize("case", [
    dict(hq=2, hkv=2, d=16, cb=4, stride=2),                       # GQA group 1
    dict(hq=4, hkv=1, d=32, cb=8, stride=4, tk=112),               # group 4
    dict(hq=16, hkv=1, d=16, cb=4, stride=2, tk=48),               # group 16
    dict(hq=2, hkv=1, d=16, cb=32, stride=16, tk=150),             # NSA's default block/stride
    dict(B=2, hq=4, hkv=2, d=16, cb=8, stride=4, tk=80),           # batch 2, no documents
    dict(hq=4, hkv=2, d=16, cb=4, stride=2, tk=120, tq=40, q_offset=50),  # a query shard
    dict(hq=2, hkv=1, d=16, cb=8, stride=4, tk=100, tq=20, q_offset=0),   # a leading shard
], ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_no_docs_fp32(monkeypatch, case):
    check_case(monkeypatch, **case)


@pytest.mark.parametrize("case", [
    dict(hq=4, hkv=1, d=32, cb=4, stride=2, tk=96, dtype=bf16),
    dict(hq=4, hkv=1, d=32, cb=4, stride=2, tk=96, dtype=fp16),
    dict(B=2, hq=2, hkv=2, d=16, cb=8, stride=4, tk=90, tq=50, q_offset=40, dtype=bf16),
], ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()).replace("torch.", ""))
def test_no_docs_16bit(monkeypatch, case):
    check_case(monkeypatch, **case)


@pytest.mark.parametrize("cb,stride,dtype", [(4, 2, fp32), (4, 2, bf16), (8, 4, fp16),
                                             (32, 16, fp32), (32, 16, bf16)], ids=str)
def test_documents(monkeypatch, cb, stride, dtype):
    """Uneven documents: lengths 1, shorter than cmp_block, and long ones."""
    lens = [1, cb - 1, 3, 60, 1, 2 * cb + 5, 17]
    tk = sum(lens)
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    check_case(monkeypatch, tk=tk, hq=4, hkv=2, d=16, cb=cb, stride=stride, cu=cu, dtype=dtype)


@pytest.mark.parametrize("tma", [False], ids=["pointer-loads"])
def test_documents_batch_without_tma(monkeypatch, tma):
    """The backward's pointer loads (the other cases take the TMA descriptors, which the
    interpreter also runs): documents with a shard, and a batch of 2."""
    from attn.nsa import cmp_bwd
    monkeypatch.setattr(cmp_bwd, "TMA", {"dq": tma, "dkdv": tma})
    check_case(monkeypatch, tk=128, tq=48, q_offset=56, hq=4, hkv=1, d=16, cb=4, stride=2,
               cu=random_docs(128, 7))
    check_case(monkeypatch, B=2, hq=4, hkv=2, d=16, cb=8, stride=4, tk=80)


def test_random_documents_shard(monkeypatch):
    """Random documents with a length-1 one; queries are a shard in the middle of the keys."""
    cu = random_docs(128, 7)
    check_case(monkeypatch, tk=128, tq=48, q_offset=56, hq=4, hkv=1, d=16, cb=4, stride=2, cu=cu)


@pytest.mark.parametrize("case", [
    dict(tk=7, cb=8, stride=4),                                    # T < cmp_block: Tc = 0
    dict(tk=30, cb=8, stride=4, cu=[0, 5, 12, 13, 20, 27, 30]),    # every document too short
    dict(tk=60, tq=6, q_offset=0, cb=8, stride=4),                 # shard before the first block
    dict(tk=60, tq=5, q_offset=40, cb=8, stride=4, cu=[0, 38, 60]),  # shard at a document start
], ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_no_visible_block(monkeypatch, case):
    """Every row sees nothing: o = 0, lse = +inf, all gradients 0."""
    _, got = check_case(monkeypatch, hq=2, hkv=1, d=16, **case)
    o, lse, dq, dk, dv = got
    assert torch.isinf(lse).all() and (lse > 0).all()
    for t in (o, dq, dk, dv):
        assert (t == 0).all()


def test_primitives_deterministic_and_lse_not_differentiable(monkeypatch):
    monkeypatch.setattr(alloc, "empty", nan_empty)
    cu = torch.tensor([0, 30, 31, 70], dtype=torch.int32)
    kw = dict(scale=0.3, cmp_block=4, cmp_stride=2, cu_seqlens=cu)
    tc = int(cmp_cu_seqlens(cu, 4, 2)[-1])
    q = torch.randn(1, 70, 4, 16)
    kc, vc = torch.randn(1, tc, 2, 16), torch.randn(1, tc, 2, 16)
    do = torch.randn_like(q)
    o, lse = cmp_attn_fwd(q, kc, vc, **kw)
    o_r, lse_r = cmp_attn_ref(q.double(), kc.double(), vc.double(), **kw)
    assert rel(o, o_r) < 1e-5 and torch.equal(torch.isinf(lse), torch.isinf(lse_r))
    g1 = cmp_attn_bwd(do, q, kc, vc, o, lse, **kw)
    g2 = cmp_attn_bwd(do, q, kc, vc, o, lse, **kw)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)
    leaves = [t.clone().requires_grad_() for t in (q, kc, vc)]
    o2, lse2 = cmp_attn(*leaves, **kw)
    assert not lse2.requires_grad and o2.requires_grad
    for a, b in zip(torch.autograd.grad(o2, leaves, do), g1):
        assert torch.equal(a, b)


def test_bad_input():
    q = torch.randn(1, 64, 4, 16)
    kc = torch.randn(1, num_cmp_blocks(64, 8, 4), 2, 16)
    kw = dict(cmp_block=8, cmp_stride=4)
    cmp_attn(q, kc, kc, **kw)                                       # the good call
    cases = [
        ((q, kc[:, :-1], kc[:, :-1]), kw, "compressed rows"),
        ((q, kc, kc), dict(kw, tk=80), "compressed rows"),
        ((q, kc, kc), dict(kw, q_offset=8, tk=64), "q_offset"),
        ((q, kc, kc), dict(kw, q_offset=-1, tk=64), "q_offset"),
        ((q[:, :, :3], kc, kc), kw, "multiple"),
        ((q, kc[..., :8], kc[..., :8]), kw, "head dim"),
        ((q[..., :8].contiguous(), kc[..., :8].contiguous(), kc[..., :8].contiguous()), kw, "D=8"),
        ((q.double(), kc.double(), kc.double()), kw, "dtype"),
        ((q, kc.half(), kc.half()), kw, "dtype"),
        ((q.transpose(1, 2).contiguous().transpose(1, 2), kc, kc), kw, "contiguous"),
        ((q, kc, kc), dict(kw, cmp_stride=0), "cmp_stride"),
        ((q, kc, kc), dict(kw, cu_seqlens=torch.tensor([0, 64])), "int32"),
        # with documents: the exact rows (9 + 5 = 14) or the padded Tc(64) = 15, not 13
        ((q, kc[:, :-2], kc[:, :-2]), dict(kw, cu_seqlens=torch.tensor([0, 40, 64],
                                                                      dtype=torch.int32)),
         "compressed rows"),
        ((q[0], kc, kc), kw, "4-D"),
    ]
    for args, k, msg in cases:
        with pytest.raises(ValueError, match=msg):
            cmp_attn(*args, **k)
    o, lse = cmp_attn(q, kc, kc, **kw)
    with pytest.raises(ValueError, match="cmp_attn_bwd: delta must be a contiguous"):
        cmp_attn_bwd(o, q, kc, kc, o, lse, scale=0.25, **kw, delta=lse[:, :1])


# ---- GPU cases (`pytest -m gpu tests/attn/nsa/test_nsa_cmp.py`)

@pytest.mark.gpu
@pytest.mark.parametrize("case", [
    dict(hq=16, hkv=4),
    dict(hq=16, hkv=4, cu="docs"),
    dict(hq=16, hkv=16, cu="docs"),
    dict(hq=64, hkv=4, tk=2048),
    dict(hq=16, hkv=4, tq=1024, q_offset=2048, cu="docs"),
    dict(hq=8, hkv=2, dtype=fp32),
], ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()).replace("torch.", ""))
def test_gpu(monkeypatch, case):
    case = dict(case)
    case.setdefault("tk", 4096)
    case.setdefault("dtype", bf16)
    if case.get("cu") == "docs":
        case["cu"] = random_docs(case["tk"], 9)
    rep, _ = check_case(monkeypatch, d=128, cb=32, stride=16, device="cuda", exact=fp32, **case)
    print({k: f"{a:.2e} (ref {b:.2e})" for k, (a, b) in rep.items()})


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "gluon"])
def test_gpu_deterministic_backward(monkeypatch, impl):
    """T = 16k with documents: the split dK/dV partials are summed in a fixed order, so two
    backward passes agree bit for bit (the Triton kernels, and NSA_CMP_IMPL=gluon's)."""
    from attn.nsa import cmp_plan
    if impl == "gluon" and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernels need a Hopper GPU")
    monkeypatch.setattr(cmp_plan, "CMP_IMPL", impl)
    monkeypatch.setattr(alloc, "empty", nan_empty)
    tk, cb, stride = 16384, 32, 16
    cu = random_docs(tk, 5).cuda()
    tc = int(cmp_cu_seqlens(cu, cb, stride)[-1])
    q = torch.randn(1, tk, 16, 128, device="cuda", dtype=bf16)
    kc, vc = (torch.randn(1, tc, 4, 128, device="cuda", dtype=bf16) for _ in range(2))
    do = torch.randn_like(q)
    kw = dict(scale=None, cmp_block=cb, cmp_stride=stride, cu_seqlens=cu)
    o, lse = cmp_attn_fwd(q, kc, vc, **kw)
    g1 = cmp_attn_bwd(do, q, kc, vc, o, lse, **kw)
    g2 = cmp_attn_bwd(do, q, kc, vc, o, lse, **kw)
    for a, b in zip(g1, g2):
        assert torch.isfinite(a).all() and torch.equal(a, b)
