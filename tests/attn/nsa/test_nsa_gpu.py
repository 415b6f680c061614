"""NSA end to end on the GPU (Triton kernels, bf16) against ref.py in fp32 at sizes the
interpreter cannot reach: group sizes 4 and 16, documents, a q_offset shard. Output and the
gradients of q, k, v, k_cmp, v_cmp and the gates, relative-norm error < 2e-2 (the fp32 reference
against bf16 inputs; selection flips from rounding touch few rows: inputs are Gaussian, scores
are continuous)."""
import pytest
import torch

pytestmark = pytest.mark.gpu

KW = dict(cmp_block=32, cmp_stride=16, sel_block=64, topk=16, window=512)


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(0.05 * b.numel() ** 0.5)).item()


@pytest.mark.parametrize("T,hq,hkv,docs,off", [(4096, 16, 4, False, 0), (2048, 64, 4, False, 0),
                                               (4096, 16, 4, True, 0), (4096, 8, 2, True, 1536)])
def test_nsa_gpu_matches_ref(monkeypatch, T, hq, hkv, docs, off):
    from attn.nsa import compress, nsa_attn
    from attn.nsa.ref import nsa_attn_ref
    torch.manual_seed(0)
    d, dev = 128, "cuda"
    cu = torch.tensor([0, 700, 701, 2500, T], dtype=torch.int32, device=dev) if docs else None
    q = torch.randn(1, T - off, hq, d, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, T, hkv, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn(1, T, hkv, d, device=dev, dtype=torch.bfloat16)
    kc, vc = compress(k, v, 32, 16, cu_seqlens=cu)
    kc, vc = kc + torch.randn_like(kc), vc + torch.randn_like(vc)
    gates = [torch.rand(1, T - off, hq, device=dev, dtype=torch.bfloat16) for _ in range(3)]
    do = torch.randn_like(q)

    def run(fn, ts):
        ts = [t.detach().clone().requires_grad_(True) for t in ts]
        o = fn(*ts, **KW, cu_seqlens=cu, q_offset=off)
        o.backward(do.to(o.dtype))
        return [o.detach()] + [t.grad for t in ts]

    inputs = [q, k, v, kc, vc, *gates]
    got = run(nsa_attn, inputs)
    want = run(nsa_attn_ref, [t.float() for t in inputs])
    names = ["o", "dq", "dk", "dv", "dk_cmp", "dv_cmp", "dg_cmp", "dg_slc", "dg_swa"]
    errs = {n: rel(a, b) for n, a, b in zip(names, got, want)}
    print(errs)
    assert all(e < 2e-2 for e in errs.values()), errs
