"""linear / lightning on the GPU (pytest -m gpu) at T·H·D past 2^31 per sequence: the 350m
model's shape (H = 16, D = 64) at T = 2^21 + 2048 tokens, the last 2048 rows past the 2^31-th
element. The kernels offset every segment's rows from an int64 base (attn/linear/kernels.py;
segment-relative offsets stay int32: SEG_LEN·H·D < 2^31, checked by op.py).

Reference for the last R rows: the state entering them, S = Σ_{u < T-R} λ^(T-R-1-u) k_uᵀ v_u, in
float64 by chunks of the prefix, then ref.chunked on the last R rows from S (float64, autograd):
o and dq of those rows, dk and dv of those rows (they reach only o of later rows, all in the
tail), and the final state. Memory plan: q, k, v, o, do, dq, dk, dv 4.3 GB each (34 GB) plus the
segment states (NS·H·D·D·4 = 0.27 GB); the reference streams 64k-row chunks (0.5 GB float64).
"""
from __future__ import annotations

import pytest
import torch

from attn.linear import ref as R
from scan_testlib import make_slopes, rel

pytestmark = pytest.mark.gpu


def big_scan_case(device, slopes, T, H, D, R_tail, chunk=65536, dtype=torch.bfloat16):
    from attn.lightning import lightning_attn
    from attn.linear import linear_attn
    q, k, v = (torch.randn(1, T, H, D, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))
    do = torch.randn_like(q)
    if slopes is None:
        o, final = linear_attn(q, k, v, output_final_state=True)
    else:
        o, final = lightning_attn(q, k, v, slopes, output_final_state=True)
    grads = torch.autograd.grad(o, (q, k, v), do)
    scale = D ** -0.5
    s0 = T - R_tail
    # the state entering row s0, float64, decays taken relative to s0 (exponents <= 0)
    S = torch.zeros(H, D, D, dtype=torch.float64, device=device)
    for a in range(0, s0, chunk):
        b = min(a + chunk, s0)
        kc, vc = (t[0, a:b].detach().double() for t in (k, v))
        if slopes is not None:
            dist = (s0 - 1 - torch.arange(a, b, device=device)).double()
            kc = kc * torch.exp(-slopes.double()[None, :] * dist[:, None])[..., None]
        S += torch.einsum("thd,the->hde", kc, vc)
    xs = [t.detach()[:, s0:].double().requires_grad_() for t in (q, k, v)]
    o64, final64 = R.chunked(*xs, None if slopes is None else slopes.double(), scale=scale,
                             initial_state=S[None])
    g64 = torch.autograd.grad(o64, xs, do[:, s0:].double())
    errs = {"final": rel(final, final64)}
    for name, g, e in zip(("o", "dq", "dk", "dv"), (o, *grads), (o64, *g64)):
        assert torch.isfinite(g[:, s0:]).all(), name
        errs[name] = rel(g[:, s0:], e)
    bad = {n: e for n, e in errs.items() if not e < (1e-2 if n == "final" else 3e-2)}
    assert not bad, (bad, errs)
    return errs


@pytest.mark.parametrize("family", ["lightning", "linear"])
def test_gpu_tokens_heads_dim_past_2_31(monkeypatch, family):
    """B = 1, T = 2^21 + 2048, H = 16, D = 64 (T·H·D = 2^31 + 2^21), bf16, forward + backward;
    LINEAR_AUTOTUNE=0 (the default configs: no tuning runs at this shape)."""
    monkeypatch.setenv("ATTN_IMPL", "triton")
    monkeypatch.setenv("LINEAR_AUTOTUNE", "0")
    H = 16
    slopes = make_slopes("mixed", H, "cuda") if family == "lightning" else None
    print(big_scan_case("cuda", slopes, T=2 ** 21 + 2048, H=H, D=64, R_tail=2048))
