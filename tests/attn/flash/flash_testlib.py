"""Shared checks for the flash tests (CPU interpreter and GPU): run the Triton op and compare
output, lse and gradients with a float64 oracle, next to the references in the input dtype.

Error measure: relative norm ||x - x64|| / ||x64||. Two references in the input dtype:
  ref   : ref.py on the same inputs (computes in fp32, rounds its output to the input dtype)
  naive : plain attention computed in the input dtype (scores, softmax and products in
          bf16/fp16 as torch runs them; for fp32 it is fp32 throughout)
Rules: fp32 inputs: kernel error <= max(4 * ref error, 5e-6) (fp32 products, ieee);
bf16 / fp16 inputs: kernel error <= naive error (the reference computed in the same dtype) and
<= 2 * ref error + 1e-4 (at most twice the output's own rounding), and < 1e-2 in any case.
lse (fp32 in every case): relative error <= 1e-5.
"""
from __future__ import annotations

import pytest
import torch

from attn.common import alloc
from attn.flash import flash_attn
from attn.flash.ref import flash_attn_ref
from attn.masks import causal_mask


def nan_empty(shape, dtype, device):
    """Poisoned outputs: every element the kernels fail to write stays NaN."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def rel(a, b):
    """||a - b|| / ||b||, the denominator floored at an rms of 0.05 (some exact gradients are
    zero: dq of a query that sees one key)."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(0.05 * b.numel() ** 0.5)).item()


def naive_attn(q, k, v, scale, cu_seqlens, q_offset, window):
    """Attention computed in the inputs' dtype by torch ops (the 'same dtype' reference)."""
    g = q.shape[2] // k.shape[2]
    qt = q.transpose(1, 2)
    kt = k.transpose(1, 2).repeat_interleave(g, 1)
    vt = v.transpose(1, 2).repeat_interleave(g, 1)
    mask = causal_mask(q.shape[1], k.shape[1], q_offset, cu_seqlens, window, device=q.device)
    s = (qt @ kt.transpose(-1, -2)) * scale
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)
    return (p @ vt).transpose(1, 2)


def random_docs(total, n_docs, gen_device="cpu"):
    """Uneven document lengths summing to `total`, with at least one document of length 1."""
    cuts = torch.randperm(total - 1)[: max(n_docs - 2, 0)] + 1
    cuts = torch.cat([cuts, torch.tensor([1])]).unique().sort().values
    return torch.cat([torch.tensor([0]), cuts, torch.tensor([total])]).to(torch.int32)


def check_case(monkeypatch, *, B=1, Tq=64, Tk=None, Hq=2, Hkv=None, D=16,
               dtype=torch.float32, q_offset=0, window=None, cu=None, device="cpu"):
    Tk = Tq if Tk is None else Tk
    Hkv = Hq if Hkv is None else Hkv
    monkeypatch.setattr(alloc, "empty", nan_empty)
    cu_t = None if cu is None else torch.as_tensor(cu, dtype=torch.int32, device=device)
    q = torch.randn(B, Tq, Hq, D, device=device).to(dtype)
    k = torch.randn(B, Tk, Hkv, D, device=device).to(dtype)
    v = torch.randn(B, Tk, Hkv, D, device=device).to(dtype)
    do = torch.randn(B, Tq, Hq, D, device=device).to(dtype)
    kw = dict(cu_seqlens=cu_t, q_offset=q_offset, window=window)
    scale = D ** -0.5

    def run(fn, dt=dtype):
        leaves = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        o, lse = fn(*leaves)
        grads = torch.autograd.grad(o, leaves, do.to(o.dtype))
        return (o, lse, *grads)

    monkeypatch.setenv("ATTN_IMPL", "triton")
    got = run(lambda a, b, c: flash_attn(a, b, c, return_lse=True, **kw))
    monkeypatch.setenv("ATTN_IMPL", "ref")
    ref = run(lambda a, b, c: flash_attn(a, b, c, return_lse=True, **kw))
    exact = run(lambda a, b, c: flash_attn_ref(a, b, c, **kw), torch.float64)
    if dtype != torch.float32:
        naive = run(lambda a, b, c: (naive_attn(a, b, c, scale, cu_t, q_offset, window), None))

    names = ["o", "lse", "dq", "dk", "dv"]
    report = {}
    for i, name in enumerate(names):
        g = got[i]
        assert g.dtype == (torch.float32 if name == "lse" else dtype), (name, g.dtype)
        assert g.shape == exact[i].shape, (name, g.shape, exact[i].shape)
        assert torch.isfinite(g).all(), f"{name}: NaN/inf (unwritten or broken elements)"
        e_k, e_r = rel(g, exact[i]), rel(ref[i], exact[i])
        report[name] = (e_k, e_r)
        if name == "lse":
            assert e_k <= 1e-5, (name, e_k)
            continue
        if dtype == torch.float32:
            assert e_k <= max(4 * e_r, 5e-6), (name, e_k, e_r)
        else:
            assert e_k < 1e-2, (name, e_k)
            e_n = rel(naive[i], exact[i])
            assert e_k <= e_n, (name, "kernel", e_k, "naive same-dtype", e_n)
            assert e_k <= 2 * e_r + 1e-4, (name, "kernel", e_k, "ref.py", e_r)
    return report


# the op tests of the Gluon kernels (test_fwd_gluon.py, test_bwd_gluon.py): GQA, D 64 / 128, fp16,
# every mask of the contract (documents, window, q_offset as a CP shard has it), ragged T
GLUON_CASES = [
    dict(B=2, Tq=1024, Hq=8, D=128),
    dict(B=1, Tq=4096, Hq=8, Hkv=2, D=128),
    dict(B=2, Tq=2048, Hq=4, D=64),
    dict(B=1, Tq=4096, Hq=4, Hkv=1, D=64),
    dict(B=1, Tq=128, Hq=2, D=128),
    dict(B=1, Tq=2048, Hq=4, Hkv=2, D=128, dtype=torch.float16),
    dict(B=1, Tq=1000, Hq=4, Hkv=2, D=128),                           # ragged last tile
    dict(B=1, Tq=3000, Hq=4, Hkv=2, D=128, cu=[0, 700, 701, 2100, 3000]),
    dict(B=1, Tq=2048, Hq=4, D=64, cu=[0, 128, 1500, 2048]),
    dict(B=2, Tq=2048, Hq=4, Hkv=2, D=128, window=300),
    dict(B=2, Tq=2048, Hq=4, Hkv=2, D=64, window=300),
    dict(B=1, Tq=1024, Tk=3000, q_offset=1900, Hq=4, Hkv=2, D=128),    # a CP shard
    dict(B=1, Tq=1024, Tk=2500, q_offset=1300, Hq=4, D=64, window=700,
         cu=[0, 900, 1800, 2500]),
]


def gluon_case_id(c: dict) -> str:
    return "-".join(f"{k}{v}" for k, v in c.items() if k != "cu").replace("torch.", "") \
        + ("-docs" if "cu" in c else "")


def skip_unless_hopper():
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernels are for Hopper (sm_90)")


def check_gluon_case(monkeypatch, case: dict):
    """check_case on CUDA for one of GLUON_CASES (bf16 unless it names a dtype), with the
    Gluon kernel the caller selected; prints the errors."""
    skip_unless_hopper()
    rep = check_case(monkeypatch, device="cuda", **{"dtype": torch.bfloat16, **case})
    print({k: f"{a:.2e} (ref {b:.2e})" for k, (a, b) in rep.items()})
