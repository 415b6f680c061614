"""The Gluon dK/dV kernel for Hopper (attn/flash/bwd_gluon.py; FLASH_DKDV_IMPL auto / gluon).
Its sm_90a compilation is checked with the forward's (test_fwd_gluon.py, gluon_aot.py). On the
CPU: the setting is validated and, off Hopper, raises instead of substituting the Triton kernel.
On the GPU (`-m gpu`): the whole op (Gluon forward, this dK/dV, Triton dQ) against the float64
oracle with flash_testlib's tolerances (documents, window, q_offset, GQA, D 64, fp16, a ragged
T), outputs poisoned; and dK, dV against the Triton dK/dV kernel to rounding."""
from __future__ import annotations

import pytest
import torch

from attn.flash import common, flash_attn, flash_bwd, flash_fwd
from flash_testlib import GLUON_CASES, check_gluon_case, gluon_case_id, skip_unless_hopper
from import_refusal import assert_import_refuses


def test_unknown_impl_is_refused():
    assert_import_refuses("attn.flash", "FLASH_DKDV_IMPL", "cuda",
                          "FLASH_DKDV_IMPL='cuda': must be auto, triton or gluon")


def test_gluon_demanded_off_hopper_raises(monkeypatch):
    monkeypatch.setattr(common, "DKDV_IMPL", "gluon")
    monkeypatch.setenv("ATTN_IMPL", "triton")
    q = torch.randn(1, 64, 2, 16, requires_grad=True)
    o = flash_attn(q, q, q)
    with pytest.raises(ValueError, match="FLASH_DKDV_IMPL=gluon: the Gluon dK/dV kernel needs "
                                         "a Hopper GPU"):
        o.sum().backward()


@pytest.mark.gpu
@pytest.mark.parametrize("case", GLUON_CASES, ids=gluon_case_id)
def test_gpu_gluon_dkdv_in_the_op(monkeypatch, case):
    monkeypatch.setattr(common, "DKDV_IMPL", "gluon")
    check_gluon_case(monkeypatch, case)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("kw", [dict(), dict(causal=False), dict(window=200, q_offset=256)],
                         ids=["causal", "full", "window-offset"])
def test_gpu_gluon_dkdv_matches_triton(monkeypatch, D, kw):
    """dK, dV as the Triton dK/dV kernel's to rounding (fp32 sums in another order, 16-bit
    outputs: at most one rounding apart; measured bit-equal on the H200, both kernels add the
    query blocks in the same order); dQ is the same kernel in both."""
    skip_unless_hopper()
    q_off = kw.get("q_offset", 0)
    tk = 2048 + q_off
    q, do = (torch.randn(2, 2048, 8, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    k, v = (torch.randn(2, tk, 4, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    monkeypatch.setenv("FLASH_AUTOTUNE", "0")
    o, lse = flash_fwd(q, k, v, **kw)
    grads = {}
    for impl in ("triton", "gluon"):
        monkeypatch.setattr(common, "DKDV_IMPL", impl)
        grads[impl] = flash_bwd(do, q, k, v, o, lse, **kw)
    for name, t, g in zip(("dq", "dk", "dv"), grads["triton"], grads["gluon"]):
        err = ((g.float() - t.float()).norm() / t.float().norm()).item()
        print(name, f"{err:.2e}")
        assert err == 0 if name == "dq" else err < 3e-3, (name, err)


@pytest.mark.gpu
def test_gpu_scope(monkeypatch):
    """Out of scope: =gluon raises naming the rule; auto runs the Triton dK/dV kernel (same
    gradients as =triton, bit for bit)."""
    skip_unless_hopper()
    monkeypatch.setenv("FLASH_AUTOTUNE", "0")
    cases = [((1, 256, 2, 32), torch.bfloat16, "D in"), ((1, 256, 2, 64), torch.float32, "bf16"),
             ((2, 200, 2, 64), torch.bfloat16, "multiple of 128")]
    for shape, dt, rule in cases:
        q, do = (torch.randn(shape, device="cuda", dtype=dt) for _ in range(2))
        o, lse = flash_fwd(q, q, q)
        monkeypatch.setattr(common, "DKDV_IMPL", "gluon")
        with pytest.raises(ValueError, match=f"FLASH_DKDV_IMPL=gluon: .*{rule}"):
            flash_bwd(do, q, q, q, o, lse)
        monkeypatch.setattr(common, "DKDV_IMPL", "auto")
        g_auto = flash_bwd(do, q, q, q, o, lse)
        monkeypatch.setattr(common, "DKDV_IMPL", "triton")
        g_triton = flash_bwd(do, q, q, q, o, lse)
        assert all(torch.equal(a, b) for a, b in zip(g_auto, g_triton))
