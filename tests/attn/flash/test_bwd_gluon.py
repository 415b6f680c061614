"""The Gluon dK/dV kernel for Hopper (attn/flash/bwd_gluon.py, FLASH_DKDV_IMPL=gluon, opt-in).
Its sm_90a compilation is checked with the forward's (test_fwd_gluon.py, gluon_aot.py). On the
CPU: the setting is validated and, off Hopper, raises instead of substituting the Triton kernel.
On the GPU (`-m gpu`): the whole op (Gluon forward, this dK/dV, Triton dQ) against the float64
oracle with flash_testlib's tolerances (documents, window, q_offset, GQA, D 64, fp16, a ragged
T), outputs poisoned; and dK, dV against the Triton dK/dV kernel to rounding."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from attn.flash import common, flash_attn, flash_bwd, flash_fwd
from flash_testlib import check_case

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))


def test_unknown_impl_is_refused():
    env = dict(os.environ, PYTHONPATH=ROOT, FLASH_DKDV_IMPL="cuda")
    r = subprocess.run([sys.executable, "-c", "import attn.flash"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "FLASH_DKDV_IMPL='cuda': must be triton or gluon" in r.stderr


def test_gluon_demanded_off_hopper_raises(monkeypatch):
    monkeypatch.setattr(common, "DKDV_IMPL", "gluon")
    monkeypatch.setenv("ATTN_IMPL", "triton")
    q = torch.randn(1, 64, 2, 16, requires_grad=True)
    o = flash_attn(q, q, q)
    with pytest.raises(ValueError, match="FLASH_DKDV_IMPL=gluon: the Gluon dK/dV kernel needs "
                                         "a Hopper GPU"):
        o.sum().backward()


def _hopper():
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernels are for Hopper (sm_90)")


@pytest.mark.gpu
@pytest.mark.parametrize("case", [
    dict(B=2, Tq=1024, Hq=8, D=128),
    dict(B=1, Tq=4096, Hq=8, Hkv=2, D=128),
    dict(B=2, Tq=2048, Hq=4, D=64),
    dict(B=1, Tq=2048, Hq=4, Hkv=1, D=64),
    dict(B=1, Tq=2048, Hq=4, Hkv=2, D=128, dtype=torch.float16),
    dict(B=1, Tq=1000, Hq=4, Hkv=2, D=128),                           # ragged last tiles
    dict(B=1, Tq=3000, Hq=4, Hkv=2, D=128, cu=[0, 700, 701, 2100, 3000]),
    dict(B=2, Tq=2048, Hq=4, Hkv=2, D=64, window=300),
    dict(B=1, Tq=1024, Tk=3000, q_offset=1900, Hq=4, Hkv=2, D=128),    # a CP shard
    dict(B=1, Tq=1024, Tk=2500, q_offset=1300, Hq=4, D=64, window=700,
         cu=[0, 900, 1800, 2500]),
], ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items() if k != "cu")
   .replace("torch.", "") + ("-docs" if "cu" in c else ""))
def test_gpu_gluon_dkdv_in_the_op(monkeypatch, case):
    _hopper()
    monkeypatch.setattr(common, "DKDV_IMPL", "gluon")
    case = dict(case)
    case.setdefault("dtype", torch.bfloat16)
    rep = check_case(monkeypatch, device="cuda", **case)
    print({k: f"{a:.2e} (ref {b:.2e})" for k, (a, b) in rep.items()})


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("kw", [dict(), dict(causal=False), dict(window=200, q_offset=256)],
                         ids=["causal", "full", "window-offset"])
def test_gpu_gluon_dkdv_matches_triton(monkeypatch, D, kw):
    """dK, dV as the Triton dK/dV kernel's to rounding (fp32 sums in another order, 16-bit
    outputs: one rounding apart, ~1e-3 relative); dQ is the same kernel in both."""
    _hopper()
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
