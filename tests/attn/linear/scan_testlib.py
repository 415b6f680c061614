"""Shared checks of the linear / lightning ops (CPU interpreter and GPU tests of both families).

`check_case` runs the public op (ATTN_IMPL=triton: the kernels; under TRITON_INTERPRET=1 on CPU
tensors) with an initial state and a loss that also reads the final state (so d final_state is
nonzero), and compares the output, the final state and the gradients of q, k, v and
initial_state with the float64 recurrence (attn/linear/ref.recurrent, the definition).

Error measure: relative norm ||x - x64|| / ||x64|| (denominator floored at rms 1e-3).
Rules: fp32 inputs: error <= 2e-5 (observed ~1e-7 on CPU; the GPU uses ieee fp32 products).
bf16 / fp16 inputs: error <= 1.25 * (error of the chunked reference computed in the same dtype,
ref.chunked, operands rounded like the kernels') + 1e-4 and < 3e-2 in every case: the kernel is
at least as accurate as the reference in the input dtype, up to the rounding order (observed at
T=130, D=32, bf16: kernel 2.5e-3 vs reference 3.5e-3 on o, dq, dk, dv; 1e-3 vs 2e-3 on states).
Outputs are allocated poisoned (NaN) so a row a kernel forgets to write fails the check.
"""
from __future__ import annotations

import os

import torch

from attn.common import alloc
from attn.linear import kernels
from attn.linear import ref as R

FP32_TOL = 2e-5


def nan_empty(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-3 * b.numel() ** 0.5)).item()


def random_docs(total, n_docs):
    """Uneven document lengths summing to `total`, one of length 1 and one empty."""
    cuts = torch.randperm(total - 2)[: max(n_docs - 3, 0)] + 2
    cuts = torch.cat([cuts, torch.tensor([1, 1])]).sort().values  # [0,1) has length 1, then empty
    return torch.cat([torch.tensor([0]), cuts, torch.tensor([total])]).to(torch.int32)


def make_slopes(kind, H, device="cpu"):
    if kind is None:
        return None
    if kind == "zero":
        return torch.zeros(H, device=device)
    if kind == "large":
        return torch.full((H,), 5.0, device=device)
    if kind == "mixed":  # ALiBi-like spread, one head without decay
        s = torch.tensor([2.0 ** (-8 * (h + 1) / H) for h in range(H)], device=device)
        s[0] = 0.0
        return s
    raise ValueError(kind)


def call(slopes, q, k, v, **kw):
    from attn.lightning import lightning_attn
    from attn.linear import linear_attn
    if slopes is None:
        return linear_attn(q, k, v, **kw)
    return lightning_attn(q, k, v, slopes, **kw)


def run_with_grads(slopes, q, k, v, init, do, dfin, cu, impl_fn):
    xs = [t.detach().clone().requires_grad_() for t in (q, k, v, init)]
    o, fin = impl_fn(slopes, *xs[:3], initial_state=xs[3], cu_seqlens=cu)
    loss = (o.double() * do.double()).sum() + (fin.double() * dfin.double()).sum()
    loss.backward()
    return o.detach(), fin.detach(), [x.grad for x in xs]


def _public(slopes, q, k, v, initial_state, cu_seqlens):
    return call(slopes, q, k, v, initial_state=initial_state, output_final_state=True,
                cu_seqlens=cu_seqlens)


def _oracle(slopes, q, k, v, initial_state, cu_seqlens):
    return R.recurrent(q, k, v, None if slopes is None else slopes.double(),
                       initial_state=initial_state, cu_seqlens=cu_seqlens)


def _chunked_ref(slopes, q, k, v, initial_state, cu_seqlens):
    return R.chunked(q, k, v, slopes, initial_state=initial_state, cu_seqlens=cu_seqlens)


def check_case(monkeypatch, *, slopes="mixed", B=1, T=64, H=2, D=16, dtype=torch.float32,
               cu=None, device="cpu", seg_len=None, with_init=True, oracle="recurrent"):
    """Kernel vs the float64 recurrence (oracle="chunked": the float64 chunked form, equal to it
    to ~1e-15 and fast at GPU sizes); returns the errors."""
    monkeypatch.setenv("ATTN_IMPL", "triton")
    monkeypatch.setattr(alloc, "empty", nan_empty)
    if seg_len is not None:
        monkeypatch.setattr(kernels, "SEG_LEN", seg_len)
    sl = make_slopes(slopes, H, device)
    cu_t = None if cu is None else torch.as_tensor(cu, dtype=torch.int32, device=device)
    N = B if cu is None else len(cu) - 1
    q, k, v = (torch.randn(B, T, H, D, device=device).to(dtype) for _ in range(3))
    init = (torch.randn(N, H, D, D, device=device) if with_init
            else torch.zeros(N, H, D, D, device=device))
    do = torch.randn(B, T, H, D, device=device).to(dtype)
    dfin = torch.randn(N, H, D, D, device=device)

    o, fin, g = run_with_grads(sl, q, k, v, init, do, dfin, cu_t, _public)
    for name, x in zip(["o", "final", "dq", "dk", "dv", "dinit"], [o, fin, *g]):
        assert torch.isfinite(x).all(), f"{name} has non-finite (unwritten?) elements"
    assert o.dtype == dtype and fin.dtype == torch.float32 and o.shape == q.shape
    assert fin.shape == (N, H, D, D)
    o64, fin64, g64 = run_with_grads(sl, q.double(), k.double(), v.double(), init.double(),
                                     do, dfin, cu_t,
                                     _oracle if oracle == "recurrent" else _chunked_ref)
    names = ["o", "final", "dq", "dk", "dv", "dinit"]
    errs = {n: rel(a, b) for n, a, b in zip(names, [o, fin, *g], [o64, fin64, *g64])}
    if dtype == torch.float32:
        bad = {n: e for n, e in errs.items() if not e <= FP32_TOL}
        assert not bad, f"fp32 errors vs float64 recurrence above {FP32_TOL}: {errs}"
    else:
        monkeypatch.setenv("ATTN_IMPL", "ref")
        oc, finc, gc = run_with_grads(sl, q, k, v, init, do, dfin, cu_t, _chunked_ref)
        ref_errs = {n: rel(a, b) for n, a, b in zip(names, [oc, finc, *gc],
                                                       [o64, fin64, *g64])}
        bad = {n: (e, ref_errs[n]) for n, e in errs.items()
               if not (e <= 1.25 * ref_errs[n] + 1e-4 and e < 3e-2)}
        assert not bad, f"{dtype} (kernel, same-dtype ref) errors: {bad}; all {errs} {ref_errs}"
        errs = {n: (e, ref_errs[n]) for n, e in errs.items()}
    return errs


def interpreter_or_cuda():
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def assert_chunks_carrying_state_equal_one_call(slopes, shape, splits, tol=1e-6):
    """Splitting the sequence at `splits` and passing the final state on (what LASP does across
    ranks) gives the one-call output, final state and q/k/v gradients."""
    q, k, v = (torch.randn(*shape, requires_grad=True) for _ in range(3))
    o, fin = call(slopes, q, k, v, output_final_state=True)
    do, dfin = torch.randn_like(o), torch.randn_like(fin)
    g_one = torch.autograd.grad((o * do).sum() + (fin * dfin).sum(), (q, k, v))
    state, outs = None, []
    for s, e in splits:
        oi, state = call(slopes, q[:, s:e], k[:, s:e], v[:, s:e], initial_state=state,
                         output_final_state=True)
        outs.append(oi)
    o2 = torch.cat(outs, 1)
    g_split = torch.autograd.grad((o2 * do).sum() + (state * dfin).sum(), (q, k, v))
    assert rel(o2, o) < tol and rel(state, fin) < tol
    for a, b in zip(g_split, g_one):
        assert rel(a, b) < tol
