"""MoBA's Gluon dK/dV kernel (attn/moba/dkdv_gluon.py, MOBA_DKDV_IMPL). CPU: the setting, the
refusal off Hopper, the demanded kernel's scope error (its compile for sm_90a is in
tests/attn/flash/gluon_aot.py). GPU (`pytest -m gpu`): the op with the kernel against the
float64 definition (moba_testlib's rules), dK / dV against the Triton kernel, determinism, and
auto taking the Triton kernel outside the scope."""
from __future__ import annotations

import pytest
import torch

from attn.moba import bwd as moba_bwd
from attn.moba.dkdv_gluon import dkdv_gluon
from import_refusal import assert_import_refuses
from moba_testlib import check_case, random_docs, rel

bf16 = torch.bfloat16


def test_unknown_setting_refused():
    assert_import_refuses("attn.moba.bwd", "MOBA_DKDV_IMPL", "fast", "MOBA_DKDV_IMPL='fast'")


def test_off_hopper_raises():
    q = torch.zeros(1, 256, 2, 128, dtype=bf16)
    with pytest.raises(ValueError, match="Hopper"):
        dkdv_gluon(q, q, q[:, :, :1], q[:, :, :1], None, None, None, 2, 2, 1.0, 128)


def test_demanded_off_hopper_names_the_setting(monkeypatch):
    monkeypatch.setattr(moba_bwd, "DKDV_IMPL", "gluon")
    q = torch.zeros(1, 256, 2, 128, dtype=bf16)
    with pytest.raises(ValueError, match="MOBA_DKDV_IMPL=gluon: .*Hopper"):
        moba_bwd._dkdv_gluon(q, q, 128, False, 0, True)
    monkeypatch.setattr(moba_bwd, "DKDV_IMPL", "auto")
    assert not moba_bwd._dkdv_gluon(q, q, 128, False, 0, True)


gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("case", [
    dict(Tq=8192, Hq=4, Hkv=2, D=128, block=512, topk=3),
    dict(Tq=4096, Hq=4, Hkv=1, D=128, block=256, topk=4, dtype=torch.float16),
    dict(B=2, Tq=2048, Hq=2, Hkv=2, D=64, block=128, topk=3),
    dict(Tq=1024, Hq=2, Hkv=1, D=128, block=128, topk=8),
], ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()).replace("torch.", ""))
def test_gpu_against_oracle(monkeypatch, case):
    case = dict(case)
    case.setdefault("dtype", bf16)
    monkeypatch.setattr(moba_bwd, "DKDV_IMPL", "gluon")
    rep, _, _ = check_case(monkeypatch, device="cuda", **case)
    print({k: f"{a:.2e} (ref {b:.2e})" for k, (a, b) in rep.items()})


def _grads(monkeypatch, impl, q, k, v, do, **kw):
    from attn.moba import moba_attn
    monkeypatch.setattr(moba_bwd, "DKDV_IMPL", impl)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    o = moba_attn(*leaves, **kw)
    return torch.autograd.grad(o, leaves, do)


@gpu
def test_gpu_against_triton_and_deterministic(monkeypatch):
    monkeypatch.setenv("ATTN_IMPL", "triton")
    T = 16384
    q = torch.randn(1, T, 8, 128, device="cuda", dtype=bf16)
    k = torch.randn(1, T, 2, 128, device="cuda", dtype=bf16)
    v = torch.randn(1, T, 2, 128, device="cuda", dtype=bf16)
    do = torch.randn_like(q)
    kw = dict(block_size=512, topk=3)
    tri = _grads(monkeypatch, "triton", q, k, v, do, **kw)
    glu = _grads(monkeypatch, "gluon", q, k, v, do, **kw)
    again = _grads(monkeypatch, "gluon", q, k, v, do, **kw)
    assert torch.equal(glu[0], tri[0])          # dQ: the same kernels
    for name, a, b, c in zip("qkv", glu, tri, again):
        assert torch.equal(a, c), f"d{name} differs between two runs"
        assert rel(a, b) < 5e-3, (name, rel(a, b))   # bf16 outputs, other summation order


@gpu
@pytest.mark.parametrize("pw", [2, 4])
def test_gpu_producer_warps_same_result(monkeypatch, pw):
    """More producer warps only split the copies: dK, dV bit for bit as with one (4 is the
    default)."""
    from attn.moba import dkdv_gluon
    monkeypatch.setenv("ATTN_IMPL", "triton")
    T = 8192
    q = torch.randn(1, T, 8, 128, device="cuda", dtype=bf16)
    k, v = (torch.randn(1, T, 2, 128, device="cuda", dtype=bf16) for _ in range(2))
    do = torch.randn_like(q)
    kw = dict(block_size=512, topk=3)
    monkeypatch.setattr(dkdv_gluon, "PRODUCER_WARPS", 1)
    one = _grads(monkeypatch, "gluon", q, k, v, do, **kw)
    monkeypatch.setattr(dkdv_gluon, "PRODUCER_WARPS", pw)
    more = _grads(monkeypatch, "gluon", q, k, v, do, **kw)
    for name, a, b in zip("qkv", one, more):
        assert torch.equal(a, b), f"d{name} differs with {pw} producer warps"


@gpu
def test_gpu_auto_outside_scope(monkeypatch):
    """Documents: auto runs the Triton kernel, gluon names the rule."""
    monkeypatch.setattr(moba_bwd, "DKDV_IMPL", "auto")
    check_case(monkeypatch, device="cuda", Tq=4096, Hq=2, Hkv=1, D=128, block=512, topk=3,
               dtype=bf16, cu=random_docs(4096, 6))
    monkeypatch.setattr(moba_bwd, "DKDV_IMPL", "gluon")
    with pytest.raises(ValueError, match="MOBA_DKDV_IMPL=gluon: .*documents"):
        check_case(monkeypatch, device="cuda", Tq=1024, Hq=2, Hkv=1, D=128, block=512, topk=3,
                   dtype=bf16, cu=[0, 512, 1024])
