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


@pytest.mark.parametrize("T,hq,hkv,docs,off,window", [
    (4096, 16, 4, False, 0, 512), (2048, 64, 4, False, 0, 512), (4096, 16, 4, True, 0, 512),
    (4096, 8, 2, True, 1536, 512),
    (4096, 64, 4, True, 1536, 0),            # no window branch (two gates)
])
def test_nsa_gpu_matches_ref(monkeypatch, T, hq, hkv, docs, off, window):
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
    gates = [torch.rand(1, T - off, hq, device=dev, dtype=torch.bfloat16)
             for _ in range(3 if window else 2)]
    do = torch.randn_like(q)

    def run(fn, ts):
        ts = [t.detach().clone().requires_grad_(True) for t in ts]
        o = fn(*ts, *([] if window else [None]), **dict(KW, window=window), cu_seqlens=cu,
               q_offset=off)
        o.backward(do.to(o.dtype))
        return [o.detach()] + [t.grad for t in ts]

    inputs = [q, k, v, kc, vc, *gates]
    got = run(nsa_attn, inputs)
    want = run(nsa_attn_ref, [t.float() for t in inputs])
    names = ["o", "dq", "dk", "dv", "dk_cmp", "dv_cmp", "dg_cmp", "dg_slc", "dg_swa"]
    errs = {n: rel(a, b) for n, a, b in zip(names, got, want)}
    print(errs)
    assert all(e < 2e-2 for e in errs.values()), errs


# ---------------------------------------------------------------------------------------------
# T·H·D past 2^31 (the kernels' int64 base offsets): the compressed and selected branches with a
# few queries at the end of a long key sequence, forward + backward over the whole of it, checked
# on what those queries depend on (float64 references, autograd).

def big_cmp_case(device, n_first, last, tq, H, D, cb=32, cs=16, dtype=torch.bfloat16):
    """Two documents: n_first keys, then `last`; k_cmp, v_cmp [1, Tc, H, D] hold both documents'
    compressed rows. tq queries at the end of the last document see only its compressed rows.
    Checks o, lse, dq, dk_cmp / dv_cmp of the last document's rows (against cmp_attn_ref on that
    document alone) and that the first document's dk_cmp / dv_cmp rows are exactly 0."""
    from attn.nsa.cmp import cmp_attn
    from attn.nsa.ref import cmp_attn_ref, num_cmp_blocks
    tk = n_first + last
    n_last = num_cmp_blocks(last, cb, cs)
    tc = num_cmp_blocks(n_first, cb, cs) + n_last
    q = torch.randn(1, tq, H, D, device=device, dtype=dtype, requires_grad=True)
    kc, vc = (torch.randn(1, tc, H, D, device=device, dtype=dtype, requires_grad=True)
              for _ in range(2))
    do = torch.randn_like(q)
    cu = torch.tensor([0, n_first, tk], dtype=torch.int32, device=device)
    o, lse = cmp_attn(q, kc, vc, cmp_block=cb, cmp_stride=cs, cu_seqlens=cu, q_offset=tk - tq,
                      tk=tk)
    dq, dkc, dvc = torch.autograd.grad(o, (q, kc, vc), do)
    xs = [q.detach().double().requires_grad_()] + \
        [t.detach()[:, tc - n_last:].double().requires_grad_() for t in (kc, vc)]
    o64, lse64 = cmp_attn_ref(*xs, cmp_block=cb, cmp_stride=cs, q_offset=last - tq, tk=last)
    g64 = torch.autograd.grad(o64, xs, do.double())
    errs = {"o": rel(o, o64), "lse": rel(lse, lse64), "dq": rel(dq, g64[0]),
            "dk": rel(dkc[:, tc - n_last:], g64[1]), "dv": rel(dvc[:, tc - n_last:], g64[2])}
    assert all(e < 1e-2 for e in errs.values()), errs
    assert not bool(dkc[:, :tc - n_last].any()) and not bool(dvc[:, :tc - n_last].any()), \
        "gradient written into compressed rows the queries do not see"
    return errs


def big_slc_case(device, T, H, D, sb=64, nsel=4, dtype=torch.bfloat16):
    """The last block's sb queries select it and the nsel − 1 blocks before it (ids in no
    particular order): causal attention over the keys [T − nsel·sb, T). Checks o, lse, dq and
    dk, dv of those keys (selected by these queries only) against flash_attn_ref (float64) on
    that slice. T must be a multiple of sb."""
    from attn.flash.ref import flash_attn_ref
    from attn.common.documents import block_table
    from attn.nsa.slc import slc_attn_bwd, slc_attn_fwd
    nb = T // sb
    q = torch.randn(1, sb, H, D, device=device, dtype=dtype)
    k, v = (torch.randn(1, T, H, D, device=device, dtype=dtype) for _ in range(2))
    do = torch.randn_like(q)
    _, _, blk_start, blk_end = block_table(None, T, sb, q.device)
    ids = torch.tensor([nb - 1 - (i * 3) % nsel for i in range(nsel)], dtype=torch.int32,
                       device=device)
    sel = ids.expand(1, sb, H, nsel).contiguous()
    kw = dict(scale=D ** -0.5, sel_block=sb, q_offset=T - sb)
    o, lse = slc_attn_fwd(q, k, v, sel, blk_start, blk_end, **kw)
    dq, dk, dv = slc_attn_bwd(do, q, k, v, o, lse, sel, blk_start, blk_end, **kw)
    s0 = T - nsel * sb
    xs = [q.double().requires_grad_()] + [t[:, s0:].double().requires_grad_() for t in (k, v)]
    o64, lse64 = flash_attn_ref(*xs, q_offset=T - sb - s0)
    g64 = torch.autograd.grad(o64, xs, do.double())
    errs = {"o": rel(o, o64), "lse": rel(lse, lse64), "dq": rel(dq, g64[0]),
            "dk": rel(dk[:, s0:], g64[1]), "dv": rel(dv[:, s0:], g64[2])}
    assert all(e < 1e-2 for e in errs.values()), errs
    return errs


def test_gpu_cmp_past_2_31(monkeypatch):
    """H = 16, D = 128: k_cmp [1, 2^20 + 510, 16, 128] (Tc·H·D = 2^31 + 510·2048; the last
    document's 511 rows lie past 2^31), 4096 queries at the end of an 8192-key last document.
    Memory: k_cmp, v_cmp, dk_cmp, dv_cmp 4.3 GB each (17 GB)."""
    monkeypatch.setenv("ATTN_IMPL", "triton")
    print(big_cmp_case("cuda", n_first=16 * 2 ** 20, last=8192, tq=4096, H=16, D=128))


def test_gpu_slc_past_2_31(monkeypatch):
    """H = 16, D = 128, T = 2^20 + 1024 keys (T·H·D = 2^31 + 2^21), blocks of 64: the last
    block's queries select the last 4 blocks (past 2^31); forward and backward (the dK/dV work
    list covers every block of the sequence). Memory: k, v, dk, dv 4.3 GB each (17 GB)."""
    monkeypatch.setenv("ATTN_IMPL", "triton")
    print(big_slc_case("cuda", T=2 ** 20 + 1024, H=16, D=128))
