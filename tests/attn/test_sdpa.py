"""The sdpa family against the dense-mask definition: documents, q_offset, window, GQA; its
FlexAttention path (attn/sdpa/flex.py): tile classification, forward on CPU, tracing, mask
cache; the CUDA path against a per-document SDPA loop (`pytest -m gpu`)."""
import pytest
import torch

import attn.sdpa.flex as flexmod
from attn import available, get_core
from attn.flash.ref import flash_attn_ref
from attn.masks import causal_mask
from attn.sdpa import sdpa_attn, sdpa_per_document
from attn.sdpa.flex import BLOCK, block_mask_for, build_block_mask, flex_sdpa


def dense_ref(q, k, v, mask, scale):
    g = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
    s = s.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v.double())


def random_cu(total, n_docs, device=None, empty=True):
    """int32 [n_docs+1] boundaries of random documents over `total` tokens (with empty=True some
    may be empty, which the contract allows)."""
    cuts = torch.randint(0 if empty else 1, total, (n_docs - 1,)).sort().values
    if not empty:
        cuts = cuts.unique()
    return torch.cat([torch.tensor([0]), cuts, torch.tensor([total])]).int().to(device)


def qkv(B, tq, tk, hq, hkv, D, dtype=torch.float32, device=None, grad=False):
    q = torch.randn(B, tq, hq, D, dtype=dtype, device=device)
    k = torch.randn(B, tk, hkv, D, dtype=dtype, device=device)
    v = torch.randn(B, tk, hkv, D, dtype=dtype, device=device)
    return [t.requires_grad_(grad) for t in (q, k, v)]


# ----------------------------------------------------------------------------- the public op

@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 1), (8, 2)])
@pytest.mark.parametrize("case", ["causal", "docs", "offset", "offset_docs", "window"])
def test_sdpa_matches_definition(hq, hkv, case):
    T, D = 37, 16
    tq, off = (T, 0) if "offset" not in case else (13, 20)
    cu = torch.tensor([0, 1, 9, 30, 37], dtype=torch.int32) if "docs" in case else None
    win = 5 if case == "window" else None
    q = torch.randn(1, tq, hq, D)
    k, v = torch.randn(1, T, hkv, D), torch.randn(1, T, hkv, D)
    o = sdpa_attn(q, k, v, cu_seqlens=cu, q_offset=off, window=win)
    ref = dense_ref(q, k, v, causal_mask(tq, T, off, cu, win), D ** -0.5)
    torch.testing.assert_close(o.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["docs", "offset_docs_window", "window"])
def test_sdpa_gradients_match_reference(case):
    """Forward and gradients of the CPU paths (per-document loop; dense mask) against
    flash_attn_ref, in float64, GQA, empty documents included."""
    T, D, hq, hkv = 150, 16, 8, 2
    tq, off = (T, 0) if "offset" not in case else (60, 70)
    cu = random_cu(T, 7) if "docs" in case else None
    win = 23 if "window" in case else None
    q, k, v = qkv(1, tq, T, hq, hkv, D, torch.float64, grad=True)
    o = sdpa_attn(q, k, v, cu_seqlens=cu, q_offset=off, window=win)
    ref, _ = flash_attn_ref(q, k, v, cu_seqlens=cu, q_offset=off, window=win)
    torch.testing.assert_close(o, ref, rtol=1e-7, atol=1e-7)
    do = torch.randn_like(o)
    for g, r in zip(torch.autograd.grad(o, (q, k, v), do), torch.autograd.grad(ref, (q, k, v), do)):
        torch.testing.assert_close(g, r, rtol=1e-7, atol=1e-7)


def test_sdpa_compiled_matches_eager():
    """torch.compile of a caller with documents: one graph (no `.tolist()` break), same numbers
    and gradients as eager."""
    T, D, hq, hkv = 96, 16, 4, 2
    cu = random_cu(T, 6, empty=False)
    q, k, v = qkv(1, T, T, hq, hkv, D, grad=True)

    def f(q, k, v, cu):
        return sdpa_attn(q * 1.5, k, v, cu_seqlens=cu).square().sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    loss_e, loss_c = f(q, k, v, cu), compiled(q, k, v, cu)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(loss_c, (q, k, v)), torch.autograd.grad(loss_e, (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_bad_inputs():
    q = torch.randn(1, 8, 3, 16)
    k = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        sdpa_attn(q, k, k)
    with pytest.raises(ValueError, match="batch size 1"):
        sdpa_attn(torch.randn(2, 8, 2, 16), torch.randn(2, 8, 2, 16), torch.randn(2, 8, 2, 16),
                  cu_seqlens=torch.tensor([0, 8], dtype=torch.int32))
    with pytest.raises(ValueError, match="q_offset"):
        sdpa_attn(torch.randn(1, 4, 2, 16), k, k, q_offset=6)
    with pytest.raises(ValueError, match="window"):
        sdpa_attn(k, k, k, window=0)
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="start at 0"):   # the flex path validates too
        flex_sdpa(q, k, k, 0.25, cu_seqlens=torch.tensor([1, 8], dtype=torch.int32),
                  compiled=False)


def test_registry():
    assert "sdpa" in available()
    assert get_core("sdpa").family == "sdpa"


# ----------------------------------------------------------------------------- the flex path

def _dense_tiles(num, idx, nq, nk):
    d = torch.zeros(nq, nk, dtype=torch.bool)
    for i in range(nq):
        d[i, idx[0, 0, i, :num[0, 0, i]].long()] = True
    return d


@pytest.mark.parametrize("tq,tk,off,docs,win", [
    (1000, 1000, 0, 9, None), (1024, 1024, 0, 1, None), (1024, 1024, 0, 0, 200),
    (300, 1000, 650, 12, 150), (129, 700, 400, 5, None), (1, 257, 256, 3, 1),
])
def test_block_mask_tiles(tq, tk, off, docs, win):
    """Every tile holding a visible (query, key) pair is listed, exactly those; tiles run
    unmasked ("full") are entirely visible and hold no padding."""
    cu = random_cu(tk, docs) if docs else None
    bm = build_block_mask(tq, tk, off, cu, win)
    nq, nk = -(-tq // BLOCK), -(-tk // BLOCK)
    m = torch.zeros(nq * BLOCK, nk * BLOCK, dtype=torch.bool)
    m[:tq, :tk] = causal_mask(tq, tk, off, cu, win)
    tiles = m.view(nq, BLOCK, nk, BLOCK)
    partial = _dense_tiles(bm.kv_num_blocks, bm.kv_indices, nq, nk)
    full = _dense_tiles(bm.full_kv_num_blocks, bm.full_kv_indices, nq, nk)
    assert not (partial & full).any()
    assert torch.equal(partial | full, tiles.any(3).any(1))
    assert tiles.all(3).all(1)[full].all()
    # the element mask the partial tiles evaluate is the contract's mask
    qi, ki = torch.arange(tq)[:, None], torch.arange(tk)[None, :]
    assert torch.equal(bm.mask_mod(0, 0, qi, ki), m[:tq, :tk])


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("B,tq,tk,off,docs,win,hq,hkv", [
    (1, 300, 300, 0, 6, None, 4, 2), (1, 150, 300, 100, 5, 40, 8, 2), (3, 50, 130, 80, 0, 20, 4, 4),
])
def test_flex_forward_matches_reference(B, tq, tk, off, docs, win, hq, hkv):
    """FlexAttention with our block mask (eager: torch's unfused implementation of the same
    mask_mod; FlexAttention has no CPU backward, the GPU test covers gradients)."""
    cu = random_cu(tk, docs) if docs else None
    q, k, v = qkv(B, tq, tk, hq, hkv, 16)
    o = flex_sdpa(q, k, v, 0.3, cu_seqlens=cu, q_offset=off, window=win, compiled=False)
    ref, _ = flash_attn_ref(q, k, v, scale=0.3, cu_seqlens=cu, q_offset=off, window=win)
    torch.testing.assert_close(o, ref, rtol=1e-5, atol=1e-5)


def test_flex_traced_one_graph_no_recompile(monkeypatch):
    """The eager path's compiled wrapper compiles once for new batches, offsets and windows (the
    mask captures tensors only); inside torch.compile the mask build and FlexAttention trace into
    one graph."""
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch.nn.attention.flex_attention import flex_attention
    counter = CompileCounterWithBackend("aot_eager")
    wrapper = torch.compile(flex_attention, backend=counter, dynamic=False)
    monkeypatch.setattr(flexmod, "_compiled_flex", lambda: wrapper)
    T, tq = 300, 150
    q, k, v = qkv(1, tq, T, 4, 2, 16)
    for docs, off, win in [(6, 100, 40), (2, 150, None), (30, 0, 3)]:
        cu = random_cu(T, docs)
        o = flex_sdpa(q, k, v, 0.25, cu_seqlens=cu, q_offset=off, window=win)
        ref, _ = flash_attn_ref(q, k, v, scale=0.25, cu_seqlens=cu, q_offset=off, window=win)
        torch.testing.assert_close(o, ref, rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1

    def f(q, k, v, cu):
        return flex_sdpa(q, k, v, 0.25, cu_seqlens=cu, q_offset=100, window=40)

    cu = random_cu(T, 9)
    o = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v, cu)
    ref, _ = flash_attn_ref(q, k, v, scale=0.25, cu_seqlens=cu, q_offset=100, window=40)
    torch.testing.assert_close(o, ref, rtol=1e-5, atol=1e-5)


def test_block_mask_cache():
    """One mask per batch across layers; never a stale one for a new or refilled cu_seqlens."""
    flexmod._CACHE.clear()
    cu = torch.tensor([0, 100, 300], dtype=torch.int32)
    a = block_mask_for(300, 300, 0, cu, None, cu.device, 1)
    assert block_mask_for(300, 300, 0, cu, None, cu.device, 1) is a        # the next layer
    assert block_mask_for(300, 300, 0, cu.clone(), None, cu.device, 1) is not a
    assert block_mask_for(200, 300, 100, cu, None, cu.device, 1) is not a
    cu.copy_(torch.tensor([0, 250, 300], dtype=torch.int32))               # refilled in place
    b = block_mask_for(300, 300, 0, cu, None, cu.device, 1)
    assert b is not a
    qi, ki = torch.arange(300)[:, None], torch.arange(300)[None, :]
    assert torch.equal(b.mask_mod(0, 0, qi, ki), causal_mask(300, 300, 0, cu))
    with torch.inference_mode():                                           # no version counter
        cu_inf = torch.tensor([0, 300], dtype=torch.int32)
        assert block_mask_for(300, 300, 0, cu_inf, None, cu.device, 1) is not None
    assert len(flexmod._CACHE) <= flexmod._CACHE_SIZE


@pytest.mark.slow
def test_flex_compiled_cpu_kernel():
    """The compiled FlexAttention kernel (inductor's CPU template) honours the tile lists:
    skipped, full and partial tiles, T not a multiple of the tile (about 20 s of compilation)."""
    tq, tk = 200, 520
    q, k, v = qkv(1, tq, tk, 4, 2, 16)
    # the first has full tiles (keys 128..255 for queries 320..447), the second a window
    for cu, off, win in [(torch.tensor([0, 37, 520]), 320, None), (random_cu(tk, 4), 300, 150)]:
        cu = cu.int()
        o = flex_sdpa(q, k, v, 0.25, cu_seqlens=cu, q_offset=off, window=win)
        ref, _ = flash_attn_ref(q, k, v, scale=0.25, cu_seqlens=cu, q_offset=off, window=win)
        torch.testing.assert_close(o, ref, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- CUDA

def _gpu_docs(T, n_docs, device="cuda"):
    """n_docs documents over T tokens, lengths random around T / n_docs (none empty)."""
    w = torch.rand(n_docs) + 0.2
    cuts = (w.cumsum(0) / w.sum() * T).round().long().clamp(max=T)
    cu = torch.cat([torch.tensor([0]), cuts]).unique()
    cu[-1] = T
    return cu.int().to(device)


def _errs(outs, refs):
    return [((a.float() - r.float()).abs().max() / r.float().abs().max()).item()
            for a, r in zip(outs, refs)]


@pytest.mark.gpu
@pytest.mark.parametrize("T,hkv", [(8192, 16), (8192, 4), (8000, 16)])
def test_gpu_docs_match_per_document_sdpa(T, hkv):
    """The CUDA path (compiled FlexAttention) against one SDPA call per document, bf16,
    forward and gradients: at least as accurate (against the fp32 loop) as the bf16 loop."""
    H, D = 16, 64
    cu = _gpu_docs(T, 30)
    q, k, v = qkv(1, T, T, H, hkv, D, torch.bfloat16, "cuda", grad=True)
    do = torch.randn(1, T, H, D, dtype=torch.bfloat16, device="cuda")
    scale = D ** -0.5

    def run(fn, *inputs):
        o = fn(*inputs)
        return [o, *torch.autograd.grad(o, inputs, do.to(o.dtype))]

    got = run(lambda q, k, v: sdpa_attn(q, k, v, cu_seqlens=cu), q, k, v)
    base = run(lambda q, k, v: sdpa_per_document(q, k, v, scale, cu), q, k, v)
    ref = run(lambda q, k, v: sdpa_per_document(q, k, v, scale, cu),
              *(t.detach().float().requires_grad_() for t in (q, k, v)))
    for name, e, b in zip(("o", "dq", "dk", "dv"), _errs(got, ref), _errs(base, ref)):
        assert e <= 2 * b + 2e-3, f"{name}: flex rel err {e:.2e}, per-document SDPA {b:.2e}"


@pytest.mark.gpu
def test_gpu_offset_window_match_reference():
    """Context-parallel shapes: queries at q_offset against longer keys, documents, a window,
    GQA; forward and gradients against flash_attn_ref (fp32 from the same bf16 inputs)."""
    tk, tq, off, H, hkv, D, win = 4096, 1024, 2048, 16, 4, 64, 700
    cu = _gpu_docs(tk, 12)
    q, k, v = qkv(1, tq, tk, H, hkv, D, torch.bfloat16, "cuda", grad=True)
    o = sdpa_attn(q, k, v, cu_seqlens=cu, q_offset=off, window=win)
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref, _ = flash_attn_ref(qf, kf, vf, cu_seqlens=cu, q_offset=off, window=win)
    do = torch.randn_like(o)
    got = [o, *torch.autograd.grad(o, (q, k, v), do)]
    exp = [ref, *torch.autograd.grad(ref, (qf, kf, vf), do.float())]
    for name, e in zip(("o", "dq", "dk", "dv"), _errs(got, exp)):
        assert e < 2e-2, f"{name}: rel err {e:.2e}"


@pytest.mark.gpu
def test_gpu_compiled_region_matches_eager():
    """Inside torch.compile (inductor, as trainer.compile=true compiles the blocks) the
    FlexAttention call runs outside the graph (a graph break): same numbers as eager."""
    T, H, D = 4096, 16, 64
    cu = _gpu_docs(T, 20)
    q, k, v = qkv(1, T, T, H, 4, D, torch.bfloat16, "cuda", grad=True)

    def f(q, k, v, cu):
        return sdpa_attn(q, k, v, cu_seqlens=cu).float().square().sum()

    compiled = torch.compile(f)
    loss_e, loss_c = f(q, k, v, cu), compiled(q, k, v, cu)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-2, atol=1e-2)
    ge = torch.autograd.grad(loss_e, (q, k, v))
    gc = torch.autograd.grad(loss_c, (q, k, v))
    for name, e in zip(("dq", "dk", "dv"), _errs(gc, ge)):
        assert e < 2e-2, f"{name}: compiled vs eager rel err {e:.2e}"
