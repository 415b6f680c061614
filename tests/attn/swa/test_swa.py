"""`attn=swa` (sliding-window softmax, a family added by its folder alone): the op through the
flash kernels (Triton interpreter) against swa's own dense reference, forward and every
gradient, GQA, documents, q_offset, fp32 and bf16; the core's checks; the model trains.

Tolerances (relative norm against the float64 reference): fp32 <= 1e-5; bf16 <= 2x the error
of the reference computed from the same bf16 inputs (rounded to bf16) + 1e-3. The kernels'
poisoned-output checks with windows are flash's (tests/attn/flash)."""
from __future__ import annotations

import pytest
import torch

from attn import get_core
from attn.swa import SWACore, swa_attn, swa_attn_ref


def rel(a, b):
    """||a - b|| / ||b||, the denominator floored at an rms of 0.05 (dq is exactly zero when a
    query sees only itself, window = 1)."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(0.05 * b.numel() ** 0.5)).item()


CASES = [dict(Tq=70, Hq=2, Hkv=2, D=16, window=9),
         dict(Tq=64, Hq=4, Hkv=2, D=32, window=64),                    # window = T: causal
         dict(Tq=90, Hq=4, Hkv=1, D=16, window=17, cu=[0, 1, 30, 31, 90]),
         dict(Tq=40, Tk=100, Hq=2, Hkv=1, D=16, window=25, q_offset=60),
         dict(Tq=50, Hq=2, Hkv=2, D=16, window=1, B=2)]                # itself only


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()
                                                                 if k != "cu"))
def test_op_matches_reference(monkeypatch, case, dtype):
    monkeypatch.setenv("ATTN_IMPL", "triton")
    c = {"B": 1, "Tk": None, "q_offset": 0, "cu": None, **case}
    B, tq, tk = c["B"], c["Tq"], c["Tk"] or c["Tq"]
    cu = None if c["cu"] is None else torch.tensor(c["cu"], dtype=torch.int32)
    kw = dict(window=c["window"], cu_seqlens=cu, q_offset=c["q_offset"])
    q = torch.randn(B, tq, c["Hq"], c["D"]).to(dtype).requires_grad_()
    k, v = (torch.randn(B, tk, c["Hkv"], c["D"]).to(dtype).requires_grad_() for _ in range(2))
    do = torch.randn(B, tq, c["Hq"], c["D"]).to(dtype)
    o = swa_attn(q, k, v, **kw)
    grads = torch.autograd.grad(o, (q, k, v), do)
    x64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    o64 = swa_attn_ref(*x64, **kw)
    grads64 = torch.autograd.grad(o64, x64, do.double())
    if dtype == torch.float32:
        bounds = [1e-5] * 4
    else:  # the reference on the same bf16 inputs, its output rounded to bf16
        xr = [t.detach().requires_grad_() for t in (q, k, v)]
        o_r = swa_attn_ref(*xr, **kw)
        grads_r = torch.autograd.grad(o_r, xr, do)
        bounds = [2 * rel(a, b) + 1e-3 for a, b in zip((o_r, *grads_r), (o64, *grads64))]
    for name, a, b, bound in zip(("o", "dq", "dk", "dv"), (o, *grads), (o64, *grads64), bounds):
        assert torch.isfinite(a).all(), name
        assert rel(a, b) <= bound, (name, rel(a, b), bound)


def test_reference_is_the_definition():
    """Query t's output is the softmax over keys (t - window, t] of its own document, written
    out for one query."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 30, 1, 8, dtype=torch.float64) for _ in range(3))
    cu = torch.tensor([0, 12, 30], dtype=torch.int32)
    o = swa_attn_ref(q, k, v, window=5, cu_seqlens=cu)
    for t, keys in ((20, range(16, 21)), (13, range(12, 14)), (3, range(0, 4))):
        s = torch.stack([q[0, t, 0] @ k[0, j, 0] for j in keys]) * 8 ** -0.5
        want = torch.softmax(s, 0) @ v[0, list(keys), 0]
        assert torch.allclose(o[0, t, 0], want, atol=1e-12)


def test_bad_window_names_the_key():
    with pytest.raises(ValueError, match=r"attn.window=0 must be an integer >= 1"):
        get_core("swa")(32, 4, 2, window=0)
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match=r"swa_attn: window=2.5 must be an integer >= 1"):
        swa_attn(q, q, q, window=2.5)


def test_core_counts_window_flops():
    core = SWACore(64, 4, 2, window=8)
    assert core.attention_flops_per_token(8) == 4 * 16 * 4 * 4.5      # (T + 1) / 2 keys
    assert core.attention_flops_per_token(1000) == pytest.approx(4 * 16 * 4 * (8 - 28 / 1000))


def test_model_trains(compose, tmp_path):
    import json
    import math

    import train
    val = train.run(compose("attn=swa", "attn.window=16", "trainer.steps=6"), tmp_path / "run")
    assert math.isfinite(val)
    rows = [json.loads(r) for r in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0]
