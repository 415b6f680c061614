"""The Gluon forwards for Hopper (attn/flash/fwd_gluon.py, FLASH_FWD_IMPL=gluon, and its
warp-specialized variant fwd_gluon_ws.py, =gluon-ws). On the CPU: they compile for sm_90a with
both triton versions' APIs (no spills, shared memory within 227 KB), and their scope is enforced
by errors, never by a fallback. On the GPU (`-m gpu`): the whole op with a Gluon forward and the
Triton backward against the float64 oracle, outputs poisoned, with
flash_testlib's tolerances (within 2x of ref.py's error in 16-bit, lse to 1e-5)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from attn.flash import common, flash_attn, flash_fwd
from flash_testlib import check_case

HERE = os.path.dirname(os.path.abspath(__file__))


def test_compiles_for_sm90_without_spills():
    root = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
    env = dict(os.environ, PYTHONPATH=root, TRITON_DEFAULT_FP_FUSION="1")
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, os.path.join(HERE, "gluon_aot.py")], env=env,
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0 and "FAILED" not in r.stdout:
        pytest.skip(f"ahead-of-time compilation unavailable here: {r.stderr[-500:]}")
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    # D 64 / 128 x (3 stages, 4 stages, warp-specialized) x bf16 / fp16
    assert r.stdout.count("regs") == 12, r.stdout


@pytest.mark.parametrize("impl", ["gluon", "gluon-ws"])
def test_scope_is_checked_not_substituted(monkeypatch, impl):
    """Inputs outside the kernel's scope raise one error naming FLASH_FWD_IMPL; inside it, a
    machine without Hopper gets the Gluon kernel's own error, not the Triton kernel."""
    monkeypatch.setattr(common, "FWD_IMPL", impl)
    monkeypatch.setenv("ATTN_IMPL", "triton")
    q = torch.randn(1, 64, 2, 16)
    cu = torch.tensor([0, 20, 64], dtype=torch.int32)
    for kw in (dict(cu_seqlens=cu), dict(window=8), dict(q_offset=4)):
        k = torch.randn(1, 64 + kw.get("q_offset", 0), 2, 16)
        with pytest.raises(ValueError, match=f"FLASH_FWD_IMPL={impl} runs causal attention"):
            flash_attn(q, k, k, **kw)
    with pytest.raises(ValueError, match=f"FLASH_FWD_IMPL={impl} runs causal attention"):
        flash_fwd(q, q, q, causal=False)
    with pytest.raises(ValueError, match="needs a Hopper GPU"):
        flash_attn(q, q, q)


@pytest.mark.gpu
@pytest.mark.parametrize("case", [
    dict(B=2, Tq=1024, Hq=8, D=128),
    dict(B=1, Tq=4096, Hq=8, Hkv=2, D=128),
    dict(B=2, Tq=2048, Hq=4, D=64),
    dict(B=1, Tq=4096, Hq=4, Hkv=1, D=64),
    dict(B=1, Tq=128, Hq=2, D=128),
    dict(B=1, Tq=2048, Hq=4, Hkv=2, D=128, dtype=torch.float16),
], ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()).replace("torch.", ""))
@pytest.mark.parametrize("impl", ["gluon", "gluon-ws"])
def test_gpu_gluon_forward_in_the_op(monkeypatch, case, impl):
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon forward is for Hopper (sm_90)")
    monkeypatch.setattr(common, "FWD_IMPL", impl)
    case = dict(case)
    case.setdefault("dtype", torch.bfloat16)
    rep = check_case(monkeypatch, device="cuda", **case)
    print({k: f"{a:.2e} (ref {b:.2e})" for k, (a, b) in rep.items()})


@pytest.mark.gpu
@pytest.mark.parametrize("stages,ws", [(3, False), (4, False), (3, True), (4, True)])
def test_gpu_gluon_matches_the_triton_forward(monkeypatch, stages, ws):
    """Same o and lse as the Triton forward to rounding (both fp32 softmax, 16-bit P)."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon forward is for Hopper (sm_90)")
    from attn.flash.fwd_gluon import fwd_gluon
    from attn.flash.fwd_gluon_ws import fwd_gluon_ws
    q, k, v = (torch.randn(2, 2048, h, 128, device="cuda", dtype=torch.bfloat16)
               for h in (8, 4, 4))
    monkeypatch.setenv("FLASH_AUTOTUNE", "0")
    o_t, lse_t = flash_fwd(q, k, v)
    o_g, lse_g = (fwd_gluon_ws if ws else fwd_gluon)(q, k, v, 128 ** -0.5, stages=stages)
    # measured on the H200 at T = 1k: 1.6e-6 and 1e-6 (the two accumulate in another order)
    assert ((o_g.float() - o_t.float()).norm() / o_t.float().norm()).item() < 1e-4
    assert (lse_g - lse_t).abs().max().item() < 1e-5
