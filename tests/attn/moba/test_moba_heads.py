"""MoBA's head pieces (attn/moba/heads.py): the rule that bounds the routed partials, the pieces
covering every (sequence, KV head) once, the op giving the same bits in pieces as in one call
(Triton interpreter, ATTN_IMPL=triton, NaN-poisoned outputs), the partial buffers it allocates,
and the settings and views it refuses. GPU (Gluon kernels, peak memory against flash):
test_moba_gpu.py."""
from __future__ import annotations

import itertools

import pytest
import torch

from attn.common import alloc
from attn.moba import heads, moba_attn
from attn.moba import routed as moba_routed
from moba_testlib import make_inputs, nan_empty


@pytest.mark.parametrize("B, hq, hkv, nsel, setting, want", [
    (1, 16, 16, 2, 0, [(0, 1, 0, 16)]),                  # no GQA, top-3: dk + dv's rows already
    (1, 16, 4, 2, 0, [(0, 1, g, g + 1) for g in range(4)]),   # G 4: one KV head per piece
    (2, 16, 4, 2, 0, [(b, b + 1, g, g + 2) for b in range(2) for g in (0, 2)]),
    (4, 8, 2, 2, 0, [(b, b + 1, 0, 2) for b in range(4)]),   # 4 pieces = 4 whole sequences
    (4, 8, 4, 2, 0, [(0, 2, 0, 4), (2, 4, 0, 4)]),           # G 2: 2 pieces of 2 sequences
    (1, 64, 1, 2, 0, [(0, 1, 0, 1)]),                    # capped: one KV head is the smallest
    (1, 16, 16, 2, 3, [(0, 1, 0, 6), (0, 1, 6, 12), (0, 1, 12, 16)]),  # MOBA_HEAD_CHUNKS=3
    (1, 16, 4, 2, 1, [(0, 1, 0, 4)]),                    # MOBA_HEAD_CHUNKS=1: one call
])
def test_pieces_rule(B, hq, hkv, nsel, setting, want):
    got = heads.head_pieces(B, hq, hkv, nsel, True, setting)
    assert [(p.b0, p.b1, p.g0, p.g1) for p in got] == want
    assert heads.head_pieces(B, hq, hkv, nsel, False, setting) == [
        heads.Piece(0, B, 0, hkv, hq // hkv)]            # nothing routed: no partials


def test_pieces_cover_every_head_once_and_bound_the_partials():
    for B, hkv, group, nsel, setting in itertools.product(
            (1, 2, 3), (1, 2, 3, 4, 8), (1, 2, 4, 8), (1, 2, 3, 15), (0, 1, 2, 5, 64)):
        hq = hkv * group
        pieces = heads.head_pieces(B, hq, hkv, nsel, True, setting)
        seen = sorted((b, g) for p in pieces for b in range(p.b0, p.b1)
                      for g in range(p.g0, p.g1))
        assert seen == [(b, g) for b in range(B) for g in range(hkv)], (B, hkv, group, pieces)
        if setting == 0:
            # partial rows per token of a piece <= dk + dv's (2·B·Hkv), unless one KV head of
            # one sequence (the smallest piece) already has more
            for p in pieces:
                rows = (p.b1 - p.b0) * (p.g1 - p.g0) * group * nsel
                assert rows <= max(2 * B * hkv, group * nsel), (B, hkv, group, nsel, p)


def _grads(monkeypatch, setting, q, k, v, do, **kw):
    monkeypatch.setattr(heads, "HEAD_CHUNKS", setting)
    monkeypatch.setattr(heads, "PIECE_FLOOR", 0)   # auto pieces at these tiny sizes
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    o = moba_attn(*leaves, **kw)
    return (o, *torch.autograd.grad(o, leaves, do))


@pytest.mark.parametrize("case", [
    dict(B=1, Hq=8, Hkv=2, topk=3, settings=(0, 2)),            # auto: one KV head per piece
    dict(B=2, Hq=4, Hkv=2, topk=3, settings=(0, 4)),            # whole sequences; per head
    dict(B=1, Hq=6, Hkv=3, topk=4, settings=(2,), q_offset=16),  # uneven pieces, CP shard
    dict(B=1, Hq=4, Hkv=4, topk=3, settings=(3,), cu=True),     # documents, no GQA
    dict(B=1, Hq=4, Hkv=2, topk=3, settings=(0,), dtype=torch.bfloat16),
])
def test_pieces_give_the_bits_of_one_call(monkeypatch, case):
    """Each (batch, head)'s work is independent, so any piecing must reproduce one call bit for
    bit: output and every gradient."""
    monkeypatch.setenv("ATTN_IMPL", "triton")
    monkeypatch.setattr(alloc, "empty", nan_empty)
    B, hq, hkv, topk = case["B"], case["Hq"], case["Hkv"], case["topk"]
    q_offset, dtype = case.get("q_offset", 0), case.get("dtype", torch.float32)
    tq = 40
    tk = tq + q_offset
    cu = torch.tensor([0, 13, 30, tk], dtype=torch.int32) if case.get("cu") else None
    q, k, v, do = make_inputs(B, tq, tk, hq, hkv, 16, dtype, 8, topk, cu, q_offset, "cpu")
    kw = dict(block_size=8, topk=topk, cu_seqlens=cu, q_offset=q_offset)
    one = _grads(monkeypatch, 1, q, k, v, do, **kw)
    for setting in case["settings"]:
        got = _grads(monkeypatch, setting, q, k, v, do, **kw)
        for name, a, b in zip(("o", "dq", "dk", "dv"), got, one):
            assert torch.isfinite(a).all(), (setting, name)
            assert torch.equal(a, b), (setting, name, (a - b).abs().max().item())


def test_partial_buffers_are_per_piece(monkeypatch):
    """With 8 query heads over 2 KV heads at top-3, one call allocates OP and DQP for all 8
    heads (2 × o each); the pieces (one KV head each) for 4 heads at a time."""
    monkeypatch.setenv("ATTN_IMPL", "triton")
    shapes = []

    def recording_empty(shape, dtype, device):
        shapes.append(tuple(shape))
        return nan_empty(shape, dtype, device)

    monkeypatch.setattr(alloc, "empty", recording_empty)
    q, k, v, do = make_inputs(1, 48, 48, 8, 2, 16, torch.float32, 8, 3, None, 0, "cpu")
    partial_rows = {}
    for setting in (1, 0):
        shapes.clear()
        _grads(monkeypatch, setting, q, k, v, do, block_size=8, topk=3)
        # routed.py allocates OP / DQP as [B·Hq, Tq·NSEL, D] and nothing else of that shape
        partial_rows[setting] = sorted({s[0] for s in shapes if len(s) == 3 and s[1] == 48 * 2})
    assert partial_rows == {1: [8], 0: [4]}, partial_rows
    assert heads.head_pieces(1, 8, 2, 2, True, 0) == [heads.Piece(0, 1, 0, 1, 4),
                                                      heads.Piece(0, 1, 1, 2, 4)]
    assert moba_routed.partial_dtype(torch.float32) == torch.float32


@pytest.mark.parametrize("T, hkv, want", [(16384, 4, 1), (32768, 4, 2), (65536, 4, 4),
                                           (131072, 4, 4), (65536, 16, 1), (65536, 2, 2)])
def test_pieces_at_training_sizes(T, hkv, want):
    """16 query heads, D 128, bf16, top-3: below PIECE_FLOOR (128 MiB of partials) one call;
    from 64k on at 16 / 4 the dk + dv bound (one KV head per piece)."""
    q = torch.empty(1, T, 16, 128, dtype=torch.bfloat16, device="meta")
    k = torch.empty(1, T, hkv, 128, dtype=torch.bfloat16, device="meta")
    pieces = heads.pieces_of(q, k, 2, True)
    assert len(pieces) == want, pieces
    assert heads.pieces_of(q, k, 2, False) == [heads.Piece(0, 1, 0, hkv, 16 // hkv)]


@pytest.mark.parametrize("value", ["0", "-1", "two", ""])
def test_bad_setting_is_refused_by_name(value):
    with pytest.raises(ValueError, match="MOBA_HEAD_CHUNKS"):
        heads._setting(value)
    assert heads._setting("auto") == 0 and heads._setting("3") == 3


def test_token_stride_refuses_views_the_kernels_cannot_address():
    q = torch.zeros(2, 8, 4, 16)
    assert heads.token_stride(q) == 64
    assert heads.token_stride(q[:1, :, 2:4]) == 64          # one sequence, two heads
    assert heads.token_stride(q[:, :, 2:4]) == 64           # (not a piece: lse's slice is not)
    # one sequence: the batch stride is never used (a CP shard's rows of a longer sequence)
    assert heads.token_stride(q[:1, :4], torch.zeros(1, 4, 4, 16)) == 64
    with pytest.raises(ValueError, match="token_stride"):
        heads.token_stride(torch.zeros(8, 2, 4, 16).transpose(0, 1))  # sequence-major tokens
    with pytest.raises(ValueError, match="token_stride"):
        heads.token_stride(q.transpose(1, 2).contiguous().transpose(1, 2))  # [B, H, T, D] data
    with pytest.raises(ValueError, match="token_stride"):
        heads.token_stride(q, torch.zeros(2, 8, 4, 16)[:, :, :, :8])  # o unlike q


def test_gather_heads_is_the_full_head_count_of_a_piece():
    """The Gluon routed kernels' producer splits batch·head by this count: a head piece of one
    sequence passes the full tensor's, whole sequences their own; a head slice of several
    sequences is not a piece and is refused."""
    q = torch.zeros(2, 8, 4, 16)
    assert heads.gather_heads(q) == 4
    assert heads.gather_heads(q[1:, :, 2:4], q[1:, :, 2:4]) == 4
    piece = heads.head_pieces(2, 4, 2, 2, True, 4)[3]
    assert (piece.b0, piece.g0) == (1, 1) and heads.gather_heads(piece.q(q)) == 4
    with pytest.raises(ValueError, match="head slice of 2 sequences"):
        heads.gather_heads(q[:, :, 2:4])
