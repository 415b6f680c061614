"""Shared checks for the MoBA kernel tests (CPU interpreter and GPU): run the Triton op and
compare output and gradients with the float64 definition (ref.py), next to ref.py in the input
dtype.

Error measure: relative norm ||x − x64|| / ||x64|| (denominator floored at an rms of 0.05).
Rules: fp32 inputs: kernel error <= max(4 · ref error, 5e-6); a gradient that is exactly zero
(dq of queries that see only themselves: ds = dp − delta, two fp32 sums of do·v in different
orders) is checked in absolute terms, max |dq| <= 1e-5;
bf16 / fp16 inputs: kernel error <= 2 · ref error + 1e-4 (ref.py computes in fp32 and rounds its
output, so this is "at most twice the output's own rounding") and < 1e-2; for dq the factor is
max(2, 1.5 · sqrt(NSEL + 1)) when blocks are routed: dq is the sum of NSEL routed partials, each
rounded to the input dtype (routed.partial_dtype), and the row's own part, rounded once more, and
independent roundings add in quadrature, so its error is sqrt(NSEL + 1) × the output's rounding on
average (docs/moba_notes.md has the measured spread).
Routing is discrete: inputs whose float64 gate scores have a near-tie at the top-(k−1) boundary
(margin < 1e-4) are redrawn, so fp32 / float64 rounding cannot flip a selection.
"""
from __future__ import annotations

import torch

from attn.common import alloc
from attn.moba import moba_attn
from attn.moba.ref import moba_attn_ref


def nan_empty(shape, dtype, device):
    """Poisoned outputs: every element the kernels fail to write stays NaN (int32: −7)."""
    if dtype == torch.int32:
        return torch.full(shape, -7, dtype=dtype, device=device)
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(0.05 * b.numel() ** 0.5)).item()


def random_docs(total, n_docs):
    """Uneven document lengths summing to `total`, with at least one document of length 1."""
    cuts = torch.randperm(total - 1)[: max(n_docs - 2, 0)] + 1
    cuts = torch.cat([cuts, torch.tensor([1])]).unique().sort().values
    return torch.cat([torch.tensor([0]), cuts, torch.tensor([total])]).to(torch.int32)


def gate_margin(q, k, block, topk, cu=None, q_offset=0):
    """Smallest float64 gap between the (k−1)-th and k-th best candidate score of any row."""
    from attn.common.documents import block_table
    nsel = topk - 1
    if nsel == 0:
        return float("inf")
    kblk, firstb, bstart, bend = (t.long() for t in block_table(cu, k.shape[1], block, q.device))
    nb = bstart.numel()
    g = q.shape[2] // k.shape[2]
    onehot = torch.zeros(nb, k.shape[1], dtype=torch.float64, device=q.device)
    onehot[kblk, torch.arange(k.shape[1], device=q.device)] = 1.0
    mk = torch.einsum("nt,bthd->bnhd", onehot / onehot.sum(1, keepdim=True), k.double())
    s = torch.einsum("bqhd,bnhd->bhqn", q.double(), mk.repeat_interleave(g, 2))
    qpos = torch.arange(q.shape[1], device=q.device) + q_offset
    j = torch.arange(nb, device=q.device)
    cand = (j[None, :] >= firstb[qpos][:, None]) & (j[None, :] < kblk[qpos][:, None])
    s = s.masked_fill(~cand, float("-inf")).sort(-1, descending=True).values
    if s.shape[-1] <= nsel:
        return float("inf")
    a, b = s[..., nsel - 1], s[..., nsel]
    gap = torch.where(torch.isfinite(b), a - b, torch.full_like(a, float("inf")))
    return gap.min().item()


def make_inputs(B, Tq, Tk, Hq, Hkv, D, dtype, block, topk, cu, q_offset, device):
    for _ in range(20):
        q = torch.randn(B, Tq, Hq, D, device=device).to(dtype)
        k = torch.randn(B, Tk, Hkv, D, device=device).to(dtype)
        if gate_margin(q, k, block, topk, cu, q_offset) > 1e-4:
            break
    v = torch.randn(B, Tk, Hkv, D, device=device).to(dtype)
    do = torch.randn(B, Tq, Hq, D, device=device).to(dtype)
    return q, k, v, do


def check_case(monkeypatch, *, B=1, Tq=64, Tk=None, Hq=2, Hkv=None, D=16, block=8, topk=3,
               dtype=torch.float32, q_offset=0, cu=None, device="cpu", grads=True):
    Tk = Tq if Tk is None else Tk
    Hkv = Hq if Hkv is None else Hkv
    monkeypatch.setattr(alloc, "empty", nan_empty)
    cu_t = None if cu is None else torch.as_tensor(cu, dtype=torch.int32, device=device)
    q, k, v, do = make_inputs(B, Tq, Tk, Hq, Hkv, D, dtype, block, topk, cu_t, q_offset, device)
    kw = dict(block_size=block, topk=topk, cu_seqlens=cu_t, q_offset=q_offset)

    def run(fn, dt=dtype):
        leaves = [t.detach().to(dt).requires_grad_(grads) for t in (q, k, v)]
        o = fn(*leaves)
        if not grads:
            return (o,)
        return (o, *torch.autograd.grad(o, leaves, do.to(o.dtype)))

    monkeypatch.setenv("ATTN_IMPL", "triton")
    got = run(lambda a, b, c: moba_attn(a, b, c, **kw))
    monkeypatch.setenv("ATTN_IMPL", "ref")
    ref = run(lambda a, b, c: moba_attn(a, b, c, **kw))
    exact = run(lambda a, b, c: moba_attn_ref(a, b, c, **kw), torch.float64)
    report = {}
    for name, g, r, x in zip(["o", "dq", "dk", "dv"], got, ref, exact):
        assert g.dtype == dtype and g.shape == x.shape, (name, g.dtype, g.shape)
        assert torch.isfinite(g).all(), f"{name}: NaN/inf (unwritten or broken elements)"
        e_k, e_r = rel(g, x), rel(r, x)
        report[name] = (e_k, e_r)
        if dtype == torch.float32 and not x.any():
            assert g.abs().max().item() <= 1e-5, (name, "exact zero", g.abs().max().item())
        elif dtype == torch.float32:
            assert e_k <= max(4 * e_r, 5e-6), (name, e_k, e_r)
        else:
            factor = max(2.0, 1.5 * (topk ** 0.5)) if name == "dq" and topk > 1 else 2.0
            assert e_k < 1e-2, (name, e_k)
            assert e_k <= factor * e_r + 1e-4, (name, "kernel", e_k, "ref.py", e_r, factor)
    return report, got, exact
