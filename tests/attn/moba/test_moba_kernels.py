"""MoBA Triton kernels (gate, forward, backward) against the dense definition ref.py, under the
Triton interpreter on CPU (ATTN_IMPL=triton): outputs and dq/dk/dv, GQA, documents (uneven,
with a length-1 document), q_offset shards, T not a multiple of the block, topk beyond the
number of earlier blocks (= full causal attention), topk = 1 (own block only), bf16/fp16.
Outputs are NaN-poisoned (moba_testlib.nan_empty) so unwritten elements fail. GPU sizes:
test_moba_gpu.py."""
from __future__ import annotations

import pytest
import torch

from attn.flash.ref import flash_attn_ref
from attn.moba import moba_attn
from moba_testlib import check_case, make_inputs, nan_empty, random_docs, rel

bf16, fp16 = torch.bfloat16, torch.float16


@pytest.mark.parametrize("case", [
    dict(Tq=64, Hq=2, D=16, block=8, topk=3),
    dict(Tq=84, Hq=4, Hkv=2, D=32, block=16, topk=3),             # T % block != 0, GQA 2
    dict(Tq=45, Hq=4, Hkv=1, D=16, block=4, topk=5),              # GQA 4, tiny blocks
    dict(B=2, Tq=60, Hq=2, Hkv=1, D=16, block=4, topk=16),        # batch, topk = 16
    dict(Tq=100, Hq=2, Hkv=1, D=16, block=8, topk=3, cu="docs"),  # uneven documents
    dict(Tq=48, Tk=130, q_offset=70, Hq=2, Hkv=1, D=16, block=8, topk=3),   # CP shard
    dict(Tq=40, Tk=140, q_offset=81, Hq=2, Hkv=1, D=16, block=6, topk=4, cu="docs"),
    dict(Tq=96, Hq=4, Hkv=2, D=32, block=16, topk=3, cu="docs", dtype=bf16),
    dict(Tq=80, Tk=112, q_offset=32, Hq=2, Hkv=1, D=16, block=8, topk=3, dtype=fp16),
    # blocks a multiple of the key tile (16 under the interpreter): mask-free routed chunks and
    # dK/dV tiles inside one block, with a CP shard's q_offset
    dict(Tq=56, Tk=136, q_offset=80, Hq=2, Hkv=1, D=16, block=32, topk=3),
], ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()).replace("torch.", ""))
def test_matches_ref(monkeypatch, case):
    case = dict(case)
    if case.get("cu") == "docs":
        case["cu"] = random_docs(case.get("Tk", case["Tq"]), 6)
    rep, _, _ = check_case(monkeypatch, **case)
    print({k: f"{a:.2e} (ref {b:.2e})" for k, (a, b) in rep.items()})


@pytest.mark.parametrize("cu", [None, "docs"])
def test_topk_beyond_the_blocks_is_full_causal_attention(monkeypatch, cu):
    T = 70
    cu = None if cu is None else random_docs(T, 4)
    # 5 blocks of 16: topk 8 takes every earlier block, i.e. full causal attention
    _, got, _ = check_case(monkeypatch, Tq=T, Hq=4, Hkv=2, D=16, block=16, topk=8, cu=cu)
    monkeypatch.setenv("ATTN_IMPL", "triton")
    q, k, v = (torch.randn(1, T, h, 16) for h in (4, 2, 2))
    o = moba_attn(q, k, v, block_size=16, topk=8, cu_seqlens=cu)
    full, _ = flash_attn_ref(q.double(), k.double(), v.double(), cu_seqlens=cu)
    assert rel(o, full) < 5e-6


def test_topk_1_is_own_block_only(monkeypatch):
    check_case(monkeypatch, Tq=70, Hq=2, Hkv=1, D=16, block=16, topk=1)
    # against the definition written directly: block-diagonal causal attention
    monkeypatch.setenv("ATTN_IMPL", "triton")
    q, k, v = (torch.randn(1, 70, h, 16) for h in (2, 1, 1))
    o = moba_attn(q, k, v, block_size=16, topk=1)
    for s in range(0, 70, 16):
        blk, _ = flash_attn_ref(q[:, s:s + 16].double(), k[:, s:s + 16].double(),
                                v[:, s:s + 16].double())
        assert rel(o[:, s:s + 16], blk) < 5e-6


def test_block_larger_than_sequence_and_length_one(monkeypatch):
    check_case(monkeypatch, Tq=40, Hq=2, D=16, block=64, topk=3)      # one block: causal
    check_case(monkeypatch, Tq=1, Hq=2, D=16, block=8, topk=3)        # a single token


def test_selection_equals_ref_mask(monkeypatch):
    """The gate kernel's chosen blocks, expanded to keys, are the ref's mask (docs, q_offset)."""
    from attn.common.documents import block_table
    from attn.moba.gate import select_blocks
    from attn.moba.ref import moba_mask
    monkeypatch.setattr("attn.common.alloc.empty", nan_empty)
    T, tq, off, bs = 130, 60, 70, 5
    cu = random_docs(T, 5)
    q, k, _, _ = make_inputs(1, tq, T, 4, 2, 16, torch.float32, bs, 4, cu, off, "cpu")
    table = block_table(cu, T, bs, "cpu")
    sel = select_blocks(q, k, table, 4, off)
    assert sel.shape == (1, 4, tq, 3) and int(sel.min()) >= -1
    kblk, _, bstart, _ = (t.long() for t in table)
    qpos = torch.arange(tq) + off
    kpos = torch.arange(T)
    mine = (kblk[None, :] == kblk[qpos][:, None]) & (kpos[None, :] <= qpos[:, None])
    picked = (sel.long()[..., None] == kblk).any(-2)                  # [1, 4, tq, T]
    assert torch.equal(picked | mine, moba_mask(q, k, block_size=bs, topk=4, cu_seqlens=cu,
                                                q_offset=off))


@pytest.mark.parametrize("topk", [3, 6])  # the gate's top-2 path and its general one
def test_selection_many_blocks_and_ties(monkeypatch, topk):
    """More candidate blocks than one gate chunk (BLOCK_J = 16 here): the chunked top-k equals the
    ref's; equal scores (identical block means) go to the earliest blocks."""
    from attn.common.documents import block_table
    from attn.moba.gate import select_blocks
    from attn.moba.ref import moba_mask
    monkeypatch.setattr("attn.common.alloc.empty", nan_empty)
    T, bs = 200, 4                                                     # 50 blocks
    for dtype in (torch.float32, bf16):
        q, k, _, _ = make_inputs(1, T, T, 2, 1, 16, dtype, bs, topk, None, 0, "cpu")
        table = block_table(None, T, bs, "cpu")
        sel = select_blocks(q, k, table, topk, 0)
        kblk = table[0].long()
        mine = (kblk[None, :] == kblk[:, None]) & (torch.arange(T)[None, :] <= torch.arange(T)[:, None])
        picked = (sel.long()[..., None] == kblk).any(-2)
        assert torch.equal(picked | mine, moba_mask(q, k, block_size=bs, topk=topk))
    k = torch.ones(1, T, 1, 16)                                        # every mean equal
    sel = select_blocks(torch.randn(1, T, 2, 16), k, block_table(None, T, bs, "cpu"), topk, 0)
    got = sel[0].long().masked_fill(sel[0] < 0, 99).sort(-1).values        # [2, T, topk-1]
    slots = torch.arange(topk - 1)[None, :]
    want = torch.where(slots < (torch.arange(T) // bs)[:, None], slots, 99)  # earliest blocks
    assert torch.equal(got, want[None].expand_as(got))


def test_inverse_index():
    """routed_entries lists, per (head, block), exactly the (row, slot) entries that chose it,
    rows ascending (stable)."""
    from attn.moba.routed import routed_entries
    nb, nsel = 9, 2
    sel = torch.randint(-1, nb, (2, 3, 40, nsel), dtype=torch.int32)
    rowptr, ent = routed_entries(sel, nb)
    flat = sel.reshape(6, 40 * nsel)
    for bh in range(6):
        for j in range(nb):
            got = ent[rowptr[bh * nb + j]:rowptr[bh * nb + j + 1]]
            assert torch.equal(got.long(), (flat[bh] == j).nonzero().flatten())


def test_backward_is_deterministic(monkeypatch):
    monkeypatch.setenv("ATTN_IMPL", "triton")
    q = torch.randn(1, 64, 4, 16, requires_grad=True)
    k = torch.randn(1, 64, 1, 16, requires_grad=True)
    v = torch.randn(1, 64, 1, 16, requires_grad=True)
    do = torch.randn(1, 64, 4, 16)
    g1, g2 = (torch.autograd.grad(moba_attn(q, k, v, block_size=8, topk=3), (q, k, v), do)
              for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_bad_arguments(monkeypatch):
    monkeypatch.setenv("ATTN_IMPL", "triton")
    q, k = torch.randn(1, 8, 2, 16), torch.randn(1, 8, 1, 16)
    with pytest.raises(ValueError, match="head dim D=24"):
        moba_attn(*(torch.randn(1, 8, 2, 24) for _ in range(3)))
    with pytest.raises(ValueError, match="topk=17"):
        moba_attn(q, k, k, topk=17)
    with pytest.raises(ValueError, match="topk=0"):
        moba_attn(q, k, k, topk=0)
    with pytest.raises(ValueError, match="block_size=0"):
        moba_attn(q, k, k, block_size=0)
    with pytest.raises(ValueError, match="dtype torch.float64"):
        moba_attn(q.double(), k.double(), k.double())
    with pytest.raises(ValueError, match="q must be contiguous"):
        moba_attn(torch.randn(1, 2, 8, 16).transpose(1, 2), k, k)
    with pytest.raises(ValueError, match="q_offset=3"):
        moba_attn(q, k, k, q_offset=3)
    with pytest.raises(ValueError, match="cu_seqlens"):
        moba_attn(q, k, k, cu_seqlens=torch.tensor([0, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match="share one dtype"):
        moba_attn(q, k.half(), k)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        moba_attn(torch.randn(1, 8, 3, 16), torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 16))


def test_larger_tiles_than_blocks_and_documents(monkeypatch):
    """GPU-like tiles (64 queries, 32 keys) over small blocks and documents: a tile spans many
    blocks and documents, every row routes on its own."""
    from attn.moba import bwd, fwd, routed
    monkeypatch.setattr(fwd, "INTERP_CFG", (64, 32, 4, 1))
    monkeypatch.setattr(routed, "INTERP_ROUTED", (32, 32, 4, 1))
    monkeypatch.setattr(bwd, "INTERP_DKDV", (32, 64, 4, 1))
    check_case(monkeypatch, Tq=100, Hq=2, Hkv=1, D=16, block=8, topk=3, cu=random_docs(100, 5))


def test_lse_of_the_forward_primitive(monkeypatch):
    """moba_fwd's lse (fp32, natural log) is the logsumexp of the scaled scores over the mask."""
    from attn.moba.op import moba_fwd
    from attn.moba.ref import moba_mask
    monkeypatch.setattr("attn.common.alloc.empty", nan_empty)
    T, tq, off = 90, 50, 40
    cu = random_docs(T, 4)
    q, k, v, _ = make_inputs(1, tq, T, 4, 2, 16, torch.float32, 8, 3, cu, off, "cpu")
    o, lse, sel, _, _ = moba_fwd(q, k, v, block_size=8, topk=3, cu_seqlens=cu, q_offset=off)
    mask = moba_mask(q, k, block_size=8, topk=3, cu_seqlens=cu, q_offset=off)
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double().repeat_interleave(2, 2)) / 4
    exact = s.masked_fill(~mask, float("-inf")).logsumexp(-1)
    assert lse.dtype == torch.float32 and lse.shape == (1, 4, tq)
    assert (lse.double() - exact).abs().max().item() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, bf16, fp16])
def test_pool_means_and_their_split(monkeypatch, dtype):
    """gate.pool_means: fp32 block means for fp32 keys; for 16-bit keys three parts in the keys'
    dtype, hi = the mean rounded to it (within half a unit), hi + mid + lo = the mean to fp32
    rounding (the gate
    scores with them on tensor cores); documents restart the blocks, short last blocks too."""
    from attn.common.documents import block_table
    from attn.moba import gate
    monkeypatch.setattr(gate.alloc, "empty", nan_empty)
    cu = random_docs(90, 4)
    k = torch.randn(1, 90, 2, 32).to(dtype)
    table = block_table(cu, 90, 16, k.device)
    _, _, start, end = table
    mean = torch.stack([k[0, s:e].double().mean(0) for s, e in zip(start.tolist(), end.tolist())])
    mk = gate.pool_means(k, table)
    if dtype == torch.float32:
        assert mk.shape == (1, start.numel(), 2, 32) and mk.dtype == torch.float32
        assert rel(mk[0], mean) < 1e-6
        return
    assert mk.shape == (3, 1, start.numel(), 2, 32) and mk.dtype == dtype
    total = mk[0, 0].double() + mk[1, 0].double() + mk[2, 0].double()
    assert (total - mean).abs().max().item() <= 2e-7 * mean.abs().max().item() + 1e-7
    half_ulp = torch.finfo(dtype).eps / 2 * mean.abs() * 1.01  # hi: the mean rounded to dtype
    assert ((mk[0, 0].double() - mean).abs() <= half_ulp + 1e-30).all()
