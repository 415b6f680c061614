"""NSA's definition (ref.py) against an independent per-query brute force, branch by branch and
gated; documents, q_offset shards, short sequences, gradients, bad input; the core, its CP
invariants (what allgather and ulysses rely on) and a tiny model training with attn=nsa."""
import math

import pytest
import torch

from attn.flash.ref import flash_attn_ref
from attn.nsa import NSACore, compress, nsa_attn
from attn.nsa.ref import cmp_cu_seqlens, nsa_branches
from parallel.allgather import clip_cu_seqlens

SMALL = dict(cmp_block=4, cmp_stride=2, sel_block=8, topk=3, window=6)


def brute_force(q, k, v, kc, vc, gates, cmp_block, cmp_stride, sel_block, topk, window,
                cu=None, q_offset=0):
    """(o_cmp, o_slc, o_swa, o) float64, every rule written out per query and GQA group."""
    B, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    scale = d ** -0.5
    bounds = [0, tk] if cu is None else cu.tolist()
    docs = list(zip(bounds[:-1], bounds[1:]))
    first_cmp, n_cmp, at = {}, {}, 0                     # compressed rows of each document
    for ds, de in docs:
        n = (de - ds - cmp_block) // cmp_stride + 1 if de - ds >= cmp_block else 0
        first_cmp[ds], n_cmp[ds], at = at, n, at + n
    padded = (tk - cmp_block) // cmp_stride + 1 if tk >= cmp_block else 0
    assert kc.shape[1] in (at, padded)  # exact, or compress's padded layout (unused rows last)
    q, k, v, kc, vc = (t.double() for t in (q, k, v, kc, vc))
    outs = [torch.zeros(B, tq, hq, d, dtype=torch.float64) for _ in range(3)]

    def attend(qv, keys, vals):
        return (keys @ qv * scale).softmax(0) @ vals

    for b in range(B):
        for i in range(tq):
            p = q_offset + i
            ds = max(s for s, _ in docs if s <= p)
            vis = [c for c in range(n_cmp[ds]) if ds + c * cmp_stride + cmp_block - 1 <= p]
            cur = (p - ds) // sel_block
            for kh in range(hkv):
                block_score = [0.0] * (cur + 1)
                for h in range(kh * g, (kh + 1) * g):
                    qv = q[b, i, h]
                    if vis:
                        rows = [first_cmp[ds] + c for c in vis]
                        probs = (kc[b, rows, kh] @ qv * scale).softmax(0)
                        outs[0][b, i, h] = probs @ vc[b, rows, kh]
                        for c, pr in zip(vis, probs.tolist()):
                            lo, hi = c * cmp_stride, c * cmp_stride + cmp_block   # doc-relative
                            for j in range(cur + 1):
                                if lo < (j + 1) * sel_block and hi > j * sel_block:
                                    block_score[j] += pr
                    lo = max(ds, p - window + 1)
                    outs[2][b, i, h] = attend(qv, k[b, lo:p + 1, kh], v[b, lo:p + 1, kh])
                forced = sorted({0, cur, max(cur - 1, 0)})
                rest = sorted((j for j in range(cur + 1) if j not in forced),
                              key=lambda j: (-block_score[j], j))
                chosen = forced + rest[:max(topk - len(forced), 0)]
                idx = sorted(s for j in chosen
                             for s in range(ds + j * sel_block, ds + (j + 1) * sel_block) if s <= p)
                for h in range(kh * g, (kh + 1) * g):
                    outs[1][b, i, h] = attend(q[b, i, h], k[b, idx, kh], v[b, idx, kh])
    o = sum(gates[..., n, None].double() * outs[n] for n in range(3))
    return (*outs, o)


def inputs(B, T, hq, hkv, d, cmp_block, cmp_stride, cu=None, dtype=torch.float64):
    tc = int(cmp_cu_seqlens(cu if cu is not None else torch.tensor([0, T], dtype=torch.int32),
                            cmp_block, cmp_stride)[-1])
    q = torch.randn(B, T, hq, d, dtype=dtype)
    k, v = torch.randn(B, T, hkv, d, dtype=dtype), torch.randn(B, T, hkv, d, dtype=dtype)
    kc, vc = torch.randn(B, tc, hkv, d, dtype=dtype), torch.randn(B, tc, hkv, d, dtype=dtype)
    gates = torch.rand(B, T, hq, 3, dtype=dtype)
    return q, k, v, kc, vc, gates


def run(q, k, v, kc, vc, gates, **kw):
    return nsa_attn(q, k, v, kc, vc, gates[..., 0], gates[..., 1], gates[..., 2], **kw)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


@pytest.mark.parametrize("B,T,hq,hkv,opts", [
    (2, 37, 2, 2, SMALL),                                   # group size 1
    (1, 45, 8, 2, SMALL),                                   # group size 4
    (1, 33, 16, 1, SMALL),                                  # group size 16
    (1, 50, 4, 2, dict(cmp_block=8, cmp_stride=4, sel_block=8, topk=4, window=10)),
    (1, 41, 4, 1, dict(cmp_block=6, cmp_stride=3, sel_block=4, topk=5, window=3)),
])
def test_branches_and_gated_sum_match_brute_force(B, T, hq, hkv, opts):
    x = inputs(B, T, hq, hkv, 8, opts["cmp_block"], opts["cmp_stride"])
    want = brute_force(*x, **opts)
    got = nsa_branches(*x[:5], **opts)[:3] + (run(*x, **opts),)
    for name, a, b in zip(("cmp", "slc", "swa", "out"), got, want):
        assert rel(a, b) < 1e-10, name


def test_without_the_window_branch():
    """window=0: ref.py's output is g_cmp·o_cmp + g_slc·o_slc of the brute force (the window
    branch's window does not enter the other two), without and with documents and a q_offset."""
    cu = torch.tensor([0, 9, 10, 45], dtype=torch.int32)
    for docs, off in ((None, 0), (cu, 0), (cu, 17)):
        x = inputs(1, 45, 8, 2, 8, 4, 2, docs)
        want = brute_force(*x, **SMALL, cu=docs)
        opts = {**SMALL, "window": 0}
        q, k, v, kc, vc, gates = x
        got = nsa_attn(q[:, off:], k, v, kc, vc, gates[:, off:, :, 0], gates[:, off:, :, 1], None,
                       **opts, cu_seqlens=docs, q_offset=off)
        two = gates[..., 0, None] * want[0] + gates[..., 1, None] * want[1]
        assert rel(got, two[:, off:]) < 1e-10, (docs, off)
        assert nsa_branches(*x[:5], **opts, cu_seqlens=docs)[2] is None


def test_selection_is_shared_by_the_group():
    x = inputs(1, 40, 16, 1, 8, 4, 2)
    sel = nsa_branches(*x[:5], **SMALL)[3]
    assert sel.shape == (1, 1, 40, 40)       # one key mask per KV head (GQA group)
    assert (sel.sum(-1) < torch.arange(1, 41)).any()  # and it is sparse at this length


def test_documents_match_brute_force():
    T = 60
    cu = torch.tensor([0, 1, 3, 20, 23, 60], dtype=torch.int32)   # lengths 1, 2, 17, 3, 37
    x = inputs(1, T, 8, 2, 8, 4, 2, cu)
    want = brute_force(*x, **SMALL, cu=cu)
    got = nsa_branches(*x[:5], **SMALL, cu_seqlens=cu)[:3] + (run(*x, **SMALL, cu_seqlens=cu),)
    for name, a, b in zip(("cmp", "slc", "swa", "out"), got, want):
        assert rel(a, b) < 1e-10, name
    assert got[0][0, :3].abs().max() == 0     # documents shorter than cmp_block: o_cmp = 0


@pytest.mark.parametrize("docs", [False, True])
def test_q_offset_shard_equals_slice_of_full_output(docs):
    T = 56
    cu = torch.tensor([0, 7, 8, 33, 56], dtype=torch.int32) if docs else None
    q, k, v, _, _, gates = inputs(1, T, 4, 2, 8, 4, 2, cu)
    kc, vc = compress(k, v, 4, 2, cu_seqlens=cu)
    full = run(q, k, v, kc, vc, gates, **SMALL, cu_seqlens=cu)
    assert rel(full, brute_force(q, k, v, kc, vc, gates, **SMALL, cu=cu)[3]) < 1e-10
    # against the full keys
    part = run(q[:, 20:45], k, v, kc, vc, gates[:, 20:45], **SMALL, cu_seqlens=cu, q_offset=20)
    assert rel(part, full[:, 20:45]) < 1e-12
    # against the key prefix [0, 45) and its compressed blocks (what all-gather CP passes)
    cu_p = clip_cu_seqlens(cu if docs else torch.tensor([0, T], dtype=torch.int32), 45)
    kcp, vcp = compress(k[:, :45], v[:, :45], 4, 2, cu_seqlens=cu_p)
    part = run(q[:, 20:45], k[:, :45], v[:, :45], kcp, vcp, gates[:, 20:45], **SMALL,
               cu_seqlens=cu_p, q_offset=20)
    assert rel(part, full[:, 20:45]) < 1e-12


def test_fewer_blocks_than_topk_is_full_causal_attention():
    opts = dict(cmp_block=4, cmp_stride=2, sel_block=8, topk=5, window=3)
    x = inputs(1, 30, 4, 2, 8, 4, 2)                    # 4 selection blocks < topk
    o_slc = nsa_branches(*x[:5], **opts)[1]
    assert rel(o_slc, flash_attn_ref(*x[:3])[0]) < 1e-12
    assert rel(run(*x, **opts), brute_force(*x, **opts)[3]) < 1e-10
    y = inputs(2, 3, 4, 2, 8, 4, 2)                     # T < cmp_block: no compressed keys
    assert y[3].shape[1] == 0
    o_cmp, o_slc, o_swa, _ = nsa_branches(*y[:5], **opts)
    assert o_cmp.abs().max() == 0 and rel(o_slc, flash_attn_ref(*y[:3])[0]) < 1e-12
    assert rel(run(*y, **opts), brute_force(*y, **opts)[3]) < 1e-10


def test_gradients_finite_and_nonzero():
    cu = torch.tensor([0, 3, 40], dtype=torch.int32)
    x = [t.requires_grad_() for t in inputs(1, 40, 4, 2, 8, 4, 2, cu)]
    run(*x, **SMALL, cu_seqlens=cu).square().sum().backward()
    for name, t in zip(("q", "k", "v", "k_cmp", "v_cmp", "gates"), x):
        assert torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0, name
    assert (x[5].grad[..., 1:] != 0).all()                # slc and swa gates: every query, head
    # the cmp gate has no effect where no compressed block is visible: positions 0..2 (a
    # document shorter than cmp_block) and 3..5 (the second document's first 3 tokens)
    sees_cmp = torch.tensor([False] * 6 + [True] * 34)
    assert ((x[5].grad[0, :, :, 0] != 0) == sees_cmp[:, None]).all()


def test_gradcheck_small():
    x = [t.requires_grad_() for t in inputs(1, 14, 2, 1, 4, 4, 2)]
    opts = dict(cmp_block=4, cmp_stride=2, sel_block=4, topk=3, window=3)
    assert torch.autograd.gradcheck(lambda *a: run(*a, **opts), tuple(x), fast_mode=True)


def test_bad_arguments():
    q, k, v, kc, vc, g = inputs(1, 16, 4, 2, 8, 4, 2, dtype=torch.float32)
    gc, gs, gw = g.unbind(-1)
    cases = [
        (dict(k=torch.randn(1, 16, 3, 8), v=torch.randn(1, 16, 3, 8)), "multiple of Hkv"),
        (dict(k=torch.randn(1, 16, 2, 4)), "expected q"),
        (dict(k_cmp=kc[:, :-1]), "k_cmp"),
        (dict(v_cmp=vc[:, :, :1]), "v_cmp"),
        (dict(g_slc=gs[:, :-1]), "g_slc"),
        (dict(g_cmp=gc[..., None]), "g_cmp"),
        (dict(g_swa=gw[:, :, :2]), "g_swa"),
        (dict(q_offset=3), "q_offset=3"),
        (dict(topk=2), "topk=2"),
        (dict(cmp_stride=8), "cmp_stride=8"),
        (dict(sel_block=0), "sel_block=0"),
        (dict(window=0), "window=0 with g_swa given"),      # window=0 takes g_swa=None
        (dict(window=-1, g_swa=None), "window=-1 must be >= 1, or 0"),
        (dict(cu_seqlens=torch.tensor([0, 16], dtype=torch.int64)), "cu_seqlens"),
        # with documents k_cmp has the exact (5) or the padded (7) row count, nothing between
        (dict(cu_seqlens=torch.tensor([0, 9, 16], dtype=torch.int32), k_cmp=kc[:, :6],
              v_cmp=vc[:, :6]), "k_cmp"),
    ]
    for change, msg in cases:
        args = dict(q=q, k=k, v=v, k_cmp=kc, v_cmp=vc, g_cmp=gc, g_slc=gs, g_swa=gw, **SMALL)
        args.update(change)
        with pytest.raises(ValueError, match=msg):
            nsa_attn(**args)


@pytest.mark.parametrize("kind", ["mlp", "mean"])
def test_compress_layout_and_core(kind):
    k, v = torch.randn(1, 23, 2, 8), torch.randn(1, 23, 2, 8)
    cu = torch.tensor([0, 2, 13, 23], dtype=torch.int32)           # Tc per document: 0, 4, 4
    kc, vc = compress(k, v, 4, 2, cu_seqlens=cu)
    # padded layout: Tc(23) = 10 rows, the documents' 8 first (no host read of cu_seqlens)
    assert cmp_cu_seqlens(cu, 4, 2).tolist() == [0, 0, 4, 8] and kc.shape == (1, 10, 2, 8)
    assert torch.allclose(kc[0, 4], k[0, 13:17].mean(0)) and torch.allclose(vc[0, 3], v[0, 8:12].mean(0))

    core = NSACore(64, 4, 2, **SMALL, compress=kind)
    x = torch.randn(2, 40, 64, requires_grad=True)
    y = core(x)
    assert y.shape == (2, 40, 64)
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all()
    for name, p in core.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # keys per query: 64/2/2 compressed + 3·8 selected + 6 window, 4·D·Hq FLOPs each, + MLPs
    mlp = 0.0 if kind == "mean" else 2 * 2 * (4 * 16 * 16 + 16 * 16) * 2 / 2
    assert core.attention_flops_per_token(64) == 4 * 16 * 4 * (16 + 24 + 6) + mlp


def test_core_without_the_window_branch():
    """attn.window=0: two gates per head (cmp, slc), every parameter gets a gradient, no window
    term in the FLOPs, and gates for three branches are refused."""
    core = NSACore(64, 4, 2, **{**SMALL, "window": 0}, compress="mean")
    assert core.w_gate.out_features == 2 * 4
    x = torch.randn(1, 40, 64, requires_grad=True)
    core(x).square().sum().backward()
    for name, p in core.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert core.attention_flops_per_token(64) == 4 * 16 * 4 * (16 + 24)
    q = torch.randn(1, 40, 4, 16)
    kv = torch.randn(1, 40, 2, 16)
    with pytest.raises(ValueError, match=r"must be \[B, Tq, Hq, 2\]"):
        core.attend(q, kv, kv, gates=torch.rand(1, 40, 4, 3))
    with pytest.raises(ValueError, match="attn.window=-1"):
        NSACore(64, 4, 2, **{**SMALL, "window": -1})


def test_core_cp_invariants():
    """allgather calls attend(q chunk, k/v prefix, clipped cu, q_offset=start, gates chunk);
    ulysses calls attend on a slice of heads (and of the gates) with the whole sequence: both
    must give the matching slice; gates of the wrong shape are refused."""
    torch.manual_seed(0)
    core = NSACore(64, 8, 4, **SMALL).double()
    for p in core.parameters():
        torch.nn.init.normal_(p, 0, 0.1)
    T, cu = 48, torch.tensor([0, 5, 6, 29, 48], dtype=torch.int32)
    x = torch.randn(1, T, 64, dtype=torch.float64)
    q, g = core.wq(x).view(1, T, 8, 8), core.gates(x)
    k, v = core.wk(x).view(1, T, 4, 8), core.wv(x).view(1, T, 4, 8)
    full = core.attend(q, k, v, cu, gates=g)
    for start, end in [(0, 12), (12, 24), (24, 36), (36, 48), (18, 30)]:
        part = core.attend(q[:, start:end], k[:, :end], v[:, :end], clip_cu_seqlens(cu, end),
                           q_offset=start, gates=g[:, start:end])
        assert rel(part, full[:, start:end]) < 1e-12, (start, end)
    heads = core.attend(q[:, :, 4:], k[:, :, 2:], v[:, :, 2:], cu, heads=slice(4, 8),
                        gates=g[:, :, 4:])
    assert rel(heads, full[:, :, 4:]) < 1e-12
    with pytest.raises(ValueError, match=r"gates \(1, 48, 8, 2\) must be \[B, Tq, Hq, 3\]"):
        core.attend(q, k, v, cu, gates=g[..., :2])


def test_tiny_model_trains(compose, tmp_path):
    import train  # here, not at module level: the GPU image has no hydra, and `pytest -m gpu
    #               tests/attn/nsa` must still collect this file
    cfg = compose("attn=nsa", "attn.cmp_block=8", "attn.cmp_stride=4", "attn.sel_block=8",
                  "attn.topk=3", "attn.window=16", "trainer.steps=6", "trainer.val_every=0",
                  "trainer.ckpt_every=0")
    val = train.run(cfg, tmp_path / "run")
    assert math.isfinite(val)
    import json
    rows = [json.loads(l) for l in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    loss = {r["step"]: r["loss"] for r in rows if "loss" in r}
    assert loss[6] < loss[1]


@pytest.mark.parametrize("T,cb,cs", [(37, 4, 2), (40, 8, 8), (29, 6, 3), (29, 5, 3), (3, 4, 2)])
def test_compress_mean_without_documents(T, cb, cs):
    """Mean pooling without documents (block starts from host arithmetic, no device copies):
    values and gradients against the gathered blocks' mean in float64."""
    torch.manual_seed(T)
    k, v = torch.randn(2, T, 3, 8), torch.randn(2, T, 3, 8)
    starts = torch.arange(max(0, (T - cb) // cs + 1)) * cs
    idx = starts[:, None] + torch.arange(cb)                        # [Tc, cb]

    def run(dtype, ours):
        kk, vv = (t.to(dtype).clone().requires_grad_(True) for t in (k, v))
        kc, vc = compress(kk, vv, cb, cs) if ours else (kk[:, idx].mean(2), vv[:, idx].mean(2))
        g = torch.randn(kc.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
        ((kc * g).sum() + vc.square().sum()).backward()
        return kc.detach(), vc.detach(), kk.grad, vv.grad

    for a, b in zip(run(torch.float32, True), run(torch.float64, False)):
        assert a.shape == b.shape and torch.allclose(a.double(), b, atol=1e-6, rtol=1e-6)
