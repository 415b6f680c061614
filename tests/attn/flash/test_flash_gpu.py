"""The flash checks at training sizes on a GPU (`pytest -m gpu tests/attn/flash`): T up to 8k,
D 64/128(/256), bf16 mainly; same oracle and tolerances as the CPU tests (flash_testlib.py).
The float64 oracle runs on the GPU too (dense scores: a few GB at T = 8k)."""
from __future__ import annotations

import pytest
import torch

from attn.flash import flash_attn
from flash_testlib import check_case, random_docs

pytestmark = pytest.mark.gpu
bf16 = torch.bfloat16


@pytest.mark.parametrize("case", [
    dict(B=2, Tq=2048, Hq=16, D=128),
    dict(B=1, Tq=8192, Hq=8, Hkv=2, D=128),
    dict(B=1, Tq=8192, Hq=4, Hkv=1, D=128, cu="docs"),
    dict(B=2, Tq=4096, Hq=8, Hkv=4, D=64, window=512),
    dict(B=1, Tq=2048, Tk=8192, q_offset=6144, Hq=8, Hkv=4, D=128),
    dict(B=1, Tq=3000, Tk=7001, q_offset=2500, Hq=4, Hkv=2, D=128, window=1000, cu="docs"),
    dict(B=1, Tq=1000, Hq=4, Hkv=1, D=64, dtype=torch.float16),
    dict(B=1, Tq=777, Hq=4, Hkv=2, D=128, dtype=torch.float32),
    dict(B=1, Tq=1024, Hq=4, Hkv=2, D=256),
], ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()).replace("torch.", ""))
def test_gpu_cases(monkeypatch, case):
    case = dict(case)
    case.setdefault("dtype", bf16)
    if case.get("cu") == "docs":
        case["cu"] = random_docs(case.get("Tk", case["Tq"]), 12)
    rep = check_case(monkeypatch, device="cuda", **case)
    print({k: f"{a:.2e} (ref {b:.2e})" for k, (a, b) in rep.items()})


def test_gpu_deterministic_backward(monkeypatch):
    monkeypatch.setenv("ATTN_IMPL", "triton")
    q = torch.randn(1, 4096, 16, 128, device="cuda", dtype=bf16, requires_grad=True)
    k = torch.randn(1, 4096, 4, 128, device="cuda", dtype=bf16, requires_grad=True)
    v = torch.randn(1, 4096, 4, 128, device="cuda", dtype=bf16, requires_grad=True)
    do = torch.randn_like(q)
    grads = []
    for _ in range(2):
        o = flash_attn(q, k, v)
        grads.append(torch.autograd.grad(o, (q, k, v), do))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_gpu_fp8_forward_option():
    """FP8 Q K^T (per-token scales): finite, close to the float64 oracle (error reported in
    docs/flash_notes.md; bound here 6e-2 relative; measured 3.3e-2 at T=4k)."""
    from attn.flash.op import flash_fwd_fp8
    from attn.flash.ref import flash_attn_ref
    from flash_testlib import rel
    q, k, v = (torch.randn(1, 2048, h, 128, device="cuda", dtype=bf16) for h in (8, 2, 2))
    o8, lse8 = flash_fwd_fp8(q, k, v)
    exact, lse64 = flash_attn_ref(q.double(), k.double(), v.double())
    assert torch.isfinite(o8).all() and o8.dtype == bf16
    assert rel(o8, exact) < 6e-2 and rel(lse8, lse64) < 1e-2
