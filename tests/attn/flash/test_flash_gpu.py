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


# ---------------------------------------------------------------------------------------------
# T·H·D past 2^31 per sequence: the kernels' int64 base offsets (attn/common/__init__.py, "Index
# arithmetic"). Only the last rows (past the 2^31-th element) are checked, against float64
# references computed on just what they depend on. FLASH_AUTOTUNE=0: the default configs (no
# tuning runs at these shapes). Memory plan in each docstring; times on an H200, excluding
# compilation.

def big_window_case(device, T, Hq, Hkv, D, W, R, dtype=bf16):
    """Sliding window W: the last R query rows see only keys [T - R - W, T), and the last R keys
    are seen only by them. Kernel forward + backward over the whole sequence, then o, lse, dq of
    the last R rows and dk, dv of the last R keys against flash_attn_ref (float64, autograd) on
    the slice [T - R - W, T)."""
    from attn.flash.ref import flash_attn_ref
    from flash_testlib import rel
    q = torch.randn(1, T, Hq, D, device=device, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(1, T, Hkv, D, device=device, dtype=dtype, requires_grad=True)
            for _ in range(2))
    do = torch.randn_like(q)
    o, lse = flash_attn(q, k, v, window=W, return_lse=True)
    got = (o, lse, *torch.autograd.grad(o, (q, k, v), do))
    s0 = T - R - W
    xs = [t.detach()[:, s0:].double().requires_grad_() for t in (q, k, v)]
    o64, lse64 = flash_attn_ref(*xs, window=W)
    ref = (o64, lse64, *torch.autograd.grad(o64, xs, do[:, s0:].double()))
    errs = {}
    for name, g, e in zip(("o", "lse", "dq", "dk", "dv"), got, ref):
        g, e = (g[..., -R:] if name == "lse" else g[:, -R:]), \
            (e[..., -R:] if name == "lse" else e[:, -R:])
        assert torch.isfinite(g).all(), name
        errs[name] = rel(g, e)
        assert errs[name] < (1e-4 if name == "lse" else 1e-2), (name, errs[name])
    return errs


def big_causal_case(device, T, H, D, R, dtype=bf16):
    """Full causal attention, no window: the last R query rows against a direct float64
    computation over all T keys (one head at a time: [R, T] scores); dk, dv of the last R keys
    (seen by the last R rows only) from the same rows' probabilities."""
    from flash_testlib import rel
    q, k, v = (torch.randn(1, T, H, D, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))
    do = torch.randn_like(q)
    o, lse = flash_attn(q, k, v, return_lse=True)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
    scale = D ** -0.5
    rows = torch.arange(T - R, T, device=device)
    mask = torch.arange(T, device=device)[None, :] <= rows[:, None]             # [R, T]
    ref = {n: [] for n in ("o", "lse", "dq", "dk", "dv")}
    for h in range(H):
        qh, doh = (t[0, T - R:, h].detach().double() for t in (q, do))        # [R, D]
        kh, vh = (t[0, :, h].detach().double() for t in (k, v))                # [T, D]
        s = (qh @ kh.T * scale).masked_fill(~mask, float("-inf"))
        lse_h = torch.logsumexp(s, -1)
        p = torch.exp(s - lse_h[:, None])
        oh = p @ vh
        ds = p * (doh @ vh.T - (doh * oh).sum(-1, keepdim=True))
        ref["o"].append(oh)
        ref["lse"].append(lse_h)
        ref["dq"].append(ds @ kh * scale)
        ref["dk"].append(ds[:, -R:].T @ qh * scale)
        ref["dv"].append(p[:, -R:].T @ doh)
        del s, p, ds
    errs = {}
    for name, g in (("o", o), ("lse", lse), ("dq", dq), ("dk", dk), ("dv", dv)):
        g = g[0, :, -R:] if name == "lse" else g[0, -R:]
        e = torch.stack(ref[name], 0 if name == "lse" else 1)
        assert torch.isfinite(g).all(), name
        errs[name] = rel(g, e)
        assert errs[name] < (1e-4 if name == "lse" else 1e-2), (name, errs[name])
    return errs


@pytest.mark.parametrize("tma", [True, False])
def test_gpu_tokens_heads_dim_past_2_31_window(monkeypatch, tma):
    """B = 1, T = 2^21 + 1024, Hq = 16, Hkv = 8, D = 128, window 512: Tq·Hq·D = 2^32 + 2^21,
    Tk·Hkv·D = 2^31 + 2^20 (the last 1024 rows lie past 2^31 in K / V, past 2^32 in Q / O).
    Memory: q, o, do, dq 8.6 GB each, k, v, dk, dv 4.3 GB each: 52 GB. TMA: the backward's
    descriptor loads (Hopper), or pointer loads (FLASH_TMA=0 path)."""
    from attn.common import launch
    monkeypatch.setenv("ATTN_IMPL", "triton")
    monkeypatch.setenv("FLASH_AUTOTUNE", "0")
    monkeypatch.setitem(launch.TMA, "dkdv", tma)
    monkeypatch.setitem(launch.TMA, "dq", tma)
    print(big_window_case("cuda", T=2 ** 21 + 1024, Hq=16, Hkv=8, D=128, W=512, R=1024))


def test_gpu_tokens_heads_dim_past_2_31_causal(monkeypatch):
    """B = 1, T = 2^17 + 128, H = 128, D = 128, full causal (many heads keep T, hence the
    quadratic cost, small: ~1.1 PFLOP forward + backward): T·H·D = 2^31 + 2^21, the last 128
    rows past 2^31. Memory: eight 4.3 GB tensors, 34 GB."""
    monkeypatch.setenv("ATTN_IMPL", "triton")
    monkeypatch.setenv("FLASH_AUTOTUNE", "0")
    print(big_causal_case("cuda", T=2 ** 17 + 128, H=128, D=128, R=64))


@pytest.mark.parametrize("case", [
    dict(B=2, Tq=4096, Hq=16, D=128),
    dict(B=1, Tq=3000, Tk=7001, q_offset=2500, Hq=4, Hkv=2, D=64, window=1000, cu="docs"),
], ids=["plain", "offset-window-docs-D64"])
def test_gpu_scores_ahead_forward(monkeypatch, case):
    """FLASH_FWD_AHEAD compiled for the GPU: oracle rules as above (the backward is shared)."""
    from attn.flash import common
    monkeypatch.setattr(common, "FWD_AHEAD", True)
    case = dict(case, dtype=bf16)
    if case.get("cu") == "docs":
        case["cu"] = random_docs(case.get("Tk", case["Tq"]), 12)
    rep = check_case(monkeypatch, device="cuda", **case)
    print({k: f"{a:.2e} (ref {b:.2e})" for k, (a, b) in rep.items()})
