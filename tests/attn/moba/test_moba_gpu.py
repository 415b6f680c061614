"""MoBA kernels at training sizes on a GPU (`pytest -m gpu tests/attn/moba`): D = 128, bf16,
block 512, topk 3. T = 8k: output and gradients against the float64 dense definition (same
rules as the CPU tests, moba_testlib.py). T = 32k: the dense oracle does not fit, so the last
1024 queries are checked through q_offset (routing is per query, so a query's output does not
depend on which other queries are in the call), and the backward must be finite and
deterministic. With GQA (16 / 4): the head pieces (attn/moba/heads.py) bit for bit against one
call, and the forward + backward's peak memory against flash's."""
from __future__ import annotations

import pytest
import torch

from attn.moba import moba_attn
from attn.moba.ref import moba_attn_ref
from moba_testlib import check_case, random_docs, rel

pytestmark = pytest.mark.gpu
bf16 = torch.bfloat16


@pytest.mark.parametrize("case", [
    dict(Tq=8192, Hq=4, Hkv=2, D=128, block=512, topk=3),
    dict(Tq=8192, Hq=4, Hkv=1, D=128, block=512, topk=3, cu="docs"),
    dict(Tq=2048, Tk=8192, q_offset=6144, Hq=4, Hkv=2, D=128, block=512, topk=3),
    dict(Tq=4000, Hq=4, Hkv=2, D=64, block=256, topk=16),
    dict(Tq=3000, Hq=2, Hkv=1, D=128, block=64, topk=5, dtype=torch.float32),
], ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()).replace("torch.", ""))
def test_gpu_cases(monkeypatch, case):
    case = dict(case)
    case.setdefault("dtype", bf16)
    if case.get("cu") == "docs":
        case["cu"] = random_docs(case.get("Tk", case["Tq"]), 8)
    rep, _, _ = check_case(monkeypatch, device="cuda", **case)
    print({k: f"{a:.2e} (ref {b:.2e})" for k, (a, b) in rep.items()})


def test_gpu_32k_tail_and_deterministic_backward(monkeypatch):
    monkeypatch.setenv("ATTN_IMPL", "triton")
    T, tail = 32768, 1024
    q = torch.randn(1, T, 16, 128, device="cuda", dtype=bf16, requires_grad=True)
    k = torch.randn(1, T, 4, 128, device="cuda", dtype=bf16, requires_grad=True)
    v = torch.randn(1, T, 4, 128, device="cuda", dtype=bf16, requires_grad=True)
    do = torch.randn_like(q)
    kw = dict(block_size=512, topk=3)
    grads = []
    for _ in range(2):
        o = moba_attn(q, k, v, **kw)
        grads.append(torch.autograd.grad(o, (q, k, v), do))
    for a, b in zip(*grads):
        assert torch.isfinite(a).all() and torch.equal(a, b)
    with torch.no_grad():
        exact = moba_attn_ref(q[:, -tail:].double(), k.double(), v.double(), q_offset=T - tail,
                              **kw)
        assert rel(o[:, -tail:].detach(), exact) < 1e-2


def big_moba_case(device, T, H, D, bs, topk, R, dtype=bf16, chunk_blocks=64):
    """T·H·D past 2^31 (the kernels' int64 base offsets): MoBA forward + backward over the whole
    sequence; the last R query rows (inside the last block) against a float64 computation of
    just what they depend on: one softmax over their selected blocks and their own block's keys
    <= the row (autograd for dq, and for dk, dv of the last R keys: only these rows see them).
    The selection is the gate's (select_blocks, as the op runs it), checked against the float64
    gate: every chosen block scores within 1e-4 of the float64 top-(k−1) (near ties may go
    either way). The rows are pulled towards block T/bs − 2 (past 2^31 too, the last complete
    earlier block): its keys get a direction u per head, the rows 8u (gate score 8 ± 1 against
    N(0, (D + 64) / bs) for the others), so the routed kernels load keys past 2^31 as well.
    T must be a multiple of bs."""
    from attn.common.documents import block_table
    from attn.moba.gate import select_blocks
    nb = T // bs
    q, k, v = (torch.randn(1, T, H, D, device=device, dtype=dtype) for _ in range(3))
    u = torch.nn.functional.normalize(torch.randn(H, D, device=device), dim=-1)
    k[0, (nb - 2) * bs:(nb - 1) * bs] += u.to(dtype)
    q[0, T - R:] += (8 * u).to(dtype)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    do = torch.randn_like(q)
    o = moba_attn(q, k, v, block_size=bs, topk=topk)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)

    # the gate's choice for the last R rows, checked against the float64 gate
    sel = select_blocks(q[:, T - R:].detach(), k.detach(), block_table(None, T, bs, q.device),
                        topk, T - R)[0].long()                                 # [H, R, k-1]
    mean_k = torch.cat([k[0, a * bs:min(a + chunk_blocks, nb) * bs].detach().double()
                        .view(-1, bs, H, D).mean(1) for a in range(0, nb, chunk_blocks)])
    qt = q[0, T - R:].detach().double().requires_grad_()                       # [R, H, D]
    gate = torch.einsum("rhd,nhd->hrn", qt.detach(), mean_k[:nb - 1])          # earlier blocks
    kth = gate.topk(topk - 1, dim=-1).values[..., -1:]
    assert bool((sel >= 0).all() and (sel < nb - 1).all()), "a row left a slot empty"
    assert bool((gate.gather(-1, sel) >= kth - 1e-4).all()), "the gate missed a top block"
    assert bool((sel == nb - 2).any(-1).all()), "the pulled rows route to block T/bs - 2"

    scale = D ** -0.5
    own0 = (nb - 1) * bs                                   # the last block: the rows' own block
    ko, vo = (t[0, own0:].detach().double().requires_grad_() for t in (k, v))  # [bs, H, D]
    keys = (sel[..., None] * bs + torch.arange(bs, device=device)).flatten(2)  # [H, R, n_sel]
    heads = torch.arange(H, device=device)[:, None, None]
    ks, vs = (t[0].detach()[keys, heads].double() for t in (k, v))             # [H, R, n, D]
    s_sel = torch.einsum("rhd,hrnd->hrn", qt, ks) * scale
    s_own = torch.einsum("rhd,shd->hrs", qt, ko) * scale
    rows = torch.arange(T - R, T, device=device)
    s_own = s_own.masked_fill(torch.arange(own0, T, device=device)[None, None, :]
                              > rows[None, :, None], float("-inf"))
    p = torch.softmax(torch.cat([s_sel, s_own], -1), -1)
    n_sel = keys.shape[-1]
    o64 = (torch.einsum("hrn,hrnd->rhd", p[..., :n_sel], vs)
           + torch.einsum("hrs,shd->rhd", p[..., n_sel:], vo))
    g64 = torch.autograd.grad(o64, (qt, ko, vo), do[0, T - R:].double())
    errs = {"o": rel(o[0, T - R:], o64), "dq": rel(dq[0, T - R:], g64[0]),
            "dk": rel(dk[0, T - R:], g64[1][-R:]), "dv": rel(dv[0, T - R:], g64[2][-R:])}
    for name, g in (("o", o), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.isfinite(g[0, T - R:]).all(), name
    assert all(e < 1e-2 for e in errs.values()), errs
    return errs


def test_gpu_tokens_heads_dim_past_2_31(monkeypatch):
    """B = 1, T = 2^20 + 1024, H = 16, D = 128 (T·H·D = 2^31 + 2^21: the last two blocks lie
    past 2^31), block 512, top-3, bf16, forward + backward. Memory: q, k, v, o, do, dq, dk, dv
    4.3 GB each and the routed partials (OP / DQP: Tq·H·(k−1)·D in bf16, 8.6 GB, one at a time):
    about 45 GB at the peak."""
    monkeypatch.setenv("ATTN_IMPL", "triton")
    print(big_moba_case("cuda", T=2 ** 20 + 1024, H=16, D=128, bs=512, topk=3, R=64))


def _gqa_inputs(T, hq=16, hkv=4, d=128):
    torch.manual_seed(0)
    q = torch.randn(1, T, hq, d, device="cuda", dtype=bf16, requires_grad=True)
    k = torch.randn(1, T, hkv, d, device="cuda", dtype=bf16, requires_grad=True)
    v = torch.randn(1, T, hkv, d, device="cuda", dtype=bf16, requires_grad=True)
    return q, k, v, torch.randn_like(q)


def test_gpu_head_pieces_bit_for_bit(monkeypatch):
    """16 / 4 heads at 8k, top-3: four head pieces (heads.py; the Gluon routed and tile kernels
    on views of the full tensors) give one call's bits, output and every gradient."""
    from attn.moba import heads
    monkeypatch.setenv("ATTN_IMPL", "triton")
    q, k, v, do = _gqa_inputs(8192)
    assert len(heads.head_pieces(1, 16, 4, 2, True, 4)) == 4
    runs = []
    for setting in (1, 4):
        monkeypatch.setattr(heads, "HEAD_CHUNKS", setting)
        o = moba_attn(q, k, v, block_size=512, topk=3)
        runs.append((o, *torch.autograd.grad(o, (q, k, v), do)))
    for name, a, b in zip(("o", "dq", "dk", "dv"), *runs):
        assert torch.isfinite(a).all() and torch.equal(a, b), name


def _peak_mib(fn, q, k, v, do):
    """Peak memory of one forward + backward above what was allocated before it, MiB."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    o = fn(q, k, v)
    grads = torch.autograd.grad(o, (q, k, v), do)
    torch.cuda.synchronize()
    del o, grads
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def test_gpu_gqa_peak_memory_within_flash(monkeypatch):
    """64k, 16 / 4 heads, D 128, top-3: MoBA's forward + backward peak at most 10 % over
    flash's (o, dq, dk, dv: 640 MiB; MoBA adds its selection, inverse index and the index's row
    ids, 24 MiB: ~1.04 × expected). One call over all heads holds the routed dQ partials of 16
    heads (2 × o) and sits ~1.6 × flash (docs/moba_notes.md); the head pieces (four at this
    size) must bring it down."""
    from attn.flash import flash_attn
    from attn.moba import heads
    monkeypatch.setenv("ATTN_IMPL", "triton")
    q, k, v, do = _gqa_inputs(65536)
    moba = lambda a, b, c: moba_attn(a, b, c, block_size=512, topk=3)  # noqa: E731
    for fn in (flash_attn, moba):          # compile and warm the allocator first
        _peak_mib(fn, q, k, v, do)
    flash = _peak_mib(flash_attn, q, k, v, do)
    monkeypatch.setattr(heads, "HEAD_CHUNKS", 0)
    pieces = _peak_mib(moba, q, k, v, do)
    monkeypatch.setattr(heads, "HEAD_CHUNKS", 1)
    one_call = _peak_mib(moba, q, k, v, do)
    print(f"peak MiB: flash {flash:.1f}, moba in pieces {pieces:.1f}, in one call {one_call:.1f}")
    assert pieces <= 1.1 * flash, (pieces, flash)
    assert one_call > 1.3 * flash, (one_call, flash)   # what the pieces are for
