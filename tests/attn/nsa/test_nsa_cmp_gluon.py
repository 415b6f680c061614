"""The compressed branch through the Gluon kernels (NSA_CMP_IMPL=gluon: the forward is
attn/flash/fwd_gluon.py's `pooled_fwd_gluon`, the dK/dV attn/nsa/cmp_bwd_gluon.py's, the dQ
cmp_bwd.py's). Their sm_90a compilation is checked with the other Gluon kernels
(tests/attn/flash/gluon_aot.py). On the CPU: the setting is validated, off Hopper the demand
raises instead of substituting the Triton kernels, and the ranges the kernels read
(cmp_plan.row_bounds, key_bounds) are checked against the definition. On the GPU (`-m gpu`):
the whole branch against the float64 definition with test_nsa_cmp.py's check and tolerances
(outputs poisoned), o, lse, dq, dk, dv against the Triton kernels, and the whole layer;
its deterministic backward: test_nsa_cmp.py's test_gpu_deterministic_backward."""
from __future__ import annotations

import pytest
import torch

from attn.nsa import cmp, cmp_plan
from attn.nsa.cmp_plan import CmpPlan, key_bounds, row_bounds
from attn.nsa.ref import cmp_cu_seqlens, num_cmp_blocks
from import_refusal import assert_import_refuses
from test_nsa_cmp import check_case, random_docs

bf16, fp16 = torch.bfloat16, torch.float16


def test_unknown_impl_is_refused():
    assert_import_refuses("attn.nsa.cmp_plan", "NSA_CMP_IMPL", "cuda",
                          "NSA_CMP_IMPL='cuda': must be auto, triton or gluon")


def test_gluon_demanded_off_hopper_raises(monkeypatch):
    monkeypatch.setattr(cmp_plan, "CMP_IMPL", "gluon")
    q = torch.randn(1, 64, 4, 16)
    kc = torch.randn(1, num_cmp_blocks(64, 8, 4), 2, 16)
    with pytest.raises(ValueError, match="NSA_CMP_IMPL=gluon: the Gluon flash forward needs a "
                                         "Hopper GPU"):
        cmp.cmp_attn_fwd(q, kc, kc, scale=None, cmp_block=8, cmp_stride=4)
    monkeypatch.setattr(cmp_plan, "CMP_IMPL", "auto")   # the default: Triton off Hopper
    o, lse = cmp.cmp_attn_fwd(q, kc, kc, scale=None, cmp_block=8, cmp_stride=4)
    cmp.cmp_attn_bwd(o, q, kc, kc, o, lse, scale=None, cmp_block=8, cmp_stride=4)
    monkeypatch.setattr(cmp_plan, "CMP_IMPL", "gluon")
    with pytest.raises(ValueError, match="NSA_CMP_IMPL=gluon: the Gluon compressed dK/dV kernel "
                                         "needs a Hopper GPU"):
        cmp.cmp_attn_bwd(o, q, kc, kc, o, lse, scale=None, cmp_block=8, cmp_stride=4)


@pytest.mark.parametrize("tk,tq,q_offset,cb,stride", [
    (300, 300, 0, 32, 16), (300, 100, 150, 32, 16), (97, 97, 0, 8, 4), (64, 40, 24, 4, 2),
    (50, 10, 0, 32, 16)], ids=str)
def test_row_bounds_follow_the_definition(tk, tq, q_offset, cb, stride):
    """Without documents: c_hi(p) = #{r < Tc : r·stride + cb − 1 <= p}, c_lo = 0, by counting;
    and the same bounds as the document path with one document."""
    tc = num_cmp_blocks(tk, cb, stride)
    q = torch.randn(1, tq, 2, 16)
    kc = torch.randn(1, tc, 1, 16)
    got = row_bounds(CmpPlan(q, kc, kc, None, cb, stride, None, q_offset, tk))
    p = torch.arange(q_offset, q_offset + tq)
    last_key = torch.arange(tc) * stride + cb - 1
    want_hi = (last_key[None, :] <= p[:, None]).sum(1)
    assert got.dtype == torch.int32 and got.shape == (2, tq) and got.is_contiguous()
    assert torch.equal(got[0], torch.zeros(tq, dtype=torch.int32))
    assert torch.equal(got[1], want_hi.to(torch.int32))
    one_doc = torch.tensor([0, tk], dtype=torch.int32)
    assert int(cmp_cu_seqlens(one_doc, cb, stride)[-1]) == tc
    docs = row_bounds(CmpPlan(q, kc, kc, None, cb, stride, one_doc, q_offset, tk))
    assert torch.equal(docs, got)


@pytest.mark.parametrize("tk,tq,q_offset,cb,stride", [
    (300, 300, 0, 32, 16), (300, 100, 200, 32, 16), (64, 40, 24, 4, 2)], ids=str)
def test_key_bounds_follow_the_definition(tk, tq, q_offset, cb, stride):
    """Compressed row c is seen by the positions [c·stride + cb − 1, last position]: by
    counting the rows whose c_hi passes c; and the document path's bounds with one document
    (whose last position is the last query's: queries end at tk)."""
    tc = num_cmp_blocks(tk, cb, stride)
    q = torch.randn(1, tq, 2, 16)
    kc = torch.randn(1, tc, 1, 16)
    plan = CmpPlan(q, kc, kc, None, cb, stride, None, q_offset, tk)
    got = key_bounds(plan)
    assert got.dtype == torch.int32 and got.shape == (2, tc) and got.is_contiguous()
    hi = row_bounds(plan)[1]
    p = torch.arange(q_offset, q_offset + tq)
    for c in range(tc):
        seen = p[hi > c]                       # the query positions that see row c
        if seen.numel():
            assert int(got[0, c]) <= int(seen[0]) and int(got[1, c]) == int(seen[-1])
            assert int(got[0, c]) == c * stride + cb - 1
    one_doc = torch.tensor([0, tk], dtype=torch.int32)
    docs = key_bounds(CmpPlan(q, kc, kc, None, cb, stride, one_doc, q_offset, tk))
    assert torch.equal(docs, got)


# ---- GPU cases (`pytest -m gpu tests/attn/nsa/test_nsa_cmp_gluon.py`)

@pytest.mark.gpu
@pytest.mark.parametrize("case", [
    dict(hq=16, hkv=4),
    dict(hq=16, hkv=4, cu="docs"),
    dict(hq=64, hkv=4, tk=2048),
    dict(hq=16, hkv=4, tq=1024, q_offset=2048, cu="docs"),
    dict(B=2, hq=8, hkv=2, tk=2048, d=64),
    dict(hq=8, hkv=2, dtype=fp16),
    dict(hq=4, hkv=1, tk=200),                                     # ragged Tq, empty first rows
    dict(hq=4, hkv=1, tk=600, cu=[0, 20, 25, 300, 310, 600]),      # short documents: empty rows
], ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()).replace("torch.", ""))
def test_gpu_gluon_cmp(monkeypatch, case):
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernels need a Hopper GPU")
    monkeypatch.setattr(cmp_plan, "CMP_IMPL", "gluon")
    monkeypatch.setenv("FLASH_AUTOTUNE", "0")
    case = dict(case)
    case.setdefault("tk", 4096)
    case.setdefault("dtype", bf16)
    case.setdefault("d", 128)
    if case.get("cu") == "docs":
        case["cu"] = random_docs(case["tk"], 9)
    rep, _ = check_case(monkeypatch, cb=32, stride=16, device="cuda", exact=torch.float64,
                        **case)
    print({k: f"{a:.2e} (ref {b:.2e})" for k, (a, b) in rep.items()})


@pytest.mark.gpu
@pytest.mark.parametrize("docs", [False, True], ids=["plain", "docs"])
def test_gpu_gluon_cmp_matches_triton(monkeypatch, docs):
    """o, lse, dq, dk, dv as the Triton kernels' at NSA's 64 / 4 heads, T = 8k (each backward
    from its own forward's o, lse): lse to fp32 rounding; the 16-bit outputs one rounding apart
    at most (P rounded after other running maxima with 128-key blocks, as the flash forward's
    Gluon-against-Triton test; fp32 partial sums in another order), +inf rows equal."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernels need a Hopper GPU")
    tk, cb, stride = 8192, 32, 16
    cu = random_docs(tk, 6).cuda() if docs else None
    tc = num_cmp_blocks(tk, cb, stride) if cu is None else int(cmp_cu_seqlens(cu, cb, stride)[-1])
    q = torch.randn(1, tk, 64, 128, device="cuda", dtype=bf16)
    kc, vc = (torch.randn(1, tc, 4, 128, device="cuda", dtype=bf16) for _ in range(2))
    kw = dict(scale=None, cmp_block=cb, cmp_stride=stride, cu_seqlens=cu)
    do = torch.randn_like(q)
    out = {}
    for impl in ("triton", "gluon"):
        monkeypatch.setattr(cmp_plan, "CMP_IMPL", impl)
        o, lse = cmp.cmp_attn_fwd(q, kc, vc, **kw)
        out[impl] = (o, lse, *cmp.cmp_attn_bwd(do, q, kc, vc, o, lse, **kw))
    (o_t, lse_t), (o_g, lse_g) = out["triton"][:2], out["gluon"][:2]
    inf = torch.isinf(lse_t)
    assert torch.equal(torch.isinf(lse_g), inf)
    e_lse = ((lse_g - lse_t).abs()[~inf] / (1 + lse_t.abs()[~inf])).max().item()
    e_o = ((o_g.float() - o_t.float()).norm() / o_t.float().norm()).item()
    print(f"lse {e_lse:.2e} o {e_o:.2e}")
    assert e_lse < 1e-5 and e_o < 3e-3, (e_lse, e_o)
    for name, t, g in zip(("dq", "dk", "dv"), out["triton"][2:], out["gluon"][2:]):
        err = ((g.float() - t.float()).norm() / t.float().norm()).item()
        print(name, f"{err:.2e}")
        assert err < 3e-3, (name, err)


@pytest.mark.gpu
@pytest.mark.parametrize("T,hq,hkv,docs,off", [(2048, 64, 4, False, 0), (4096, 16, 4, True, 0),
                                               (4096, 8, 2, True, 1536)])
def test_gpu_gluon_nsa_layer_matches_ref(monkeypatch, T, hq, hkv, docs, off):
    """The whole NSA layer (gate fold, three branches) with the Gluon compressed branch against
    ref.py: test_nsa_gpu.py's check and tolerance."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernels need a Hopper GPU")
    from test_nsa_gpu import test_nsa_gpu_matches_ref as layer_check
    monkeypatch.setattr(cmp_plan, "CMP_IMPL", "gluon")
    layer_check(monkeypatch, T, hq, hkv, docs, off)
