"""MoBA's persistent Gluon tile forward and dQ (attn/moba/tile_gluon.py, tile_dq_gluon.py;
MOBA_TILE_IMPL, MOBA_TILE_DQ_IMPL). CPU: the settings, the refusal off Hopper (their compile for
sm_90a is in tests/attn/flash/gluon_aot.py). GPU (`pytest -m gpu`): o / lse and dQ against
fwd.py's Triton tile kernel on the same partials (outputs poisoned: NaN where a row is left
unwritten), with GQA, q_offset and 1 to 7 routed slots, on fewer programs than tiles (each
program walks several tiles through the two-slot Q ring); the op with both against the float64
definition (moba_testlib's rules)."""
from __future__ import annotations

import pytest
import torch

from attn.moba import fwd as moba_fwd_mod
from import_refusal import assert_import_refuses
from moba_testlib import check_case, nan_empty

bf16 = torch.bfloat16


def test_unknown_setting_refused():
    assert_import_refuses("attn.moba.fwd", "MOBA_TILE_IMPL", "x", "MOBA_TILE_IMPL='x'")
    assert_import_refuses("attn.moba.fwd", "MOBA_TILE_DQ_IMPL", "x", "MOBA_TILE_DQ_IMPL='x'")


def test_off_hopper_raises(monkeypatch):
    monkeypatch.setattr(moba_fwd_mod, "TILE_IMPL", "gluon")
    q = torch.zeros(1, 256, 2, 128, dtype=bf16)
    with pytest.raises(ValueError, match="MOBA_TILE_IMPL=gluon: .*Hopper"):
        moba_fwd_mod._tile_gluon(q, q, 128, 0, False)
    monkeypatch.setattr(moba_fwd_mod, "TILE_IMPL", "auto")
    assert not moba_fwd_mod._tile_gluon(q, q, 128, 0, False)
    monkeypatch.setattr(moba_fwd_mod, "TILE_DQ_IMPL", "gluon")
    with pytest.raises(ValueError, match="MOBA_TILE_DQ_IMPL=gluon: .*Hopper"):
        moba_fwd_mod._tile_dq_gluon(q, q, 128, 0, False)
    monkeypatch.setattr(moba_fwd_mod, "TILE_DQ_IMPL", "auto")
    assert not moba_fwd_mod._tile_dq_gluon(q, q, 128, 0, False)


gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("programs", [None, 7])
@pytest.mark.parametrize("shape", [
    (1, 8192, 8192, 4, 2, 128, 512, 3, bf16),
    (2, 2048, 2048, 4, 4, 64, 256, 4, torch.float16),
    (1, 4096, 4096, 2, 1, 128, 128, 8, bf16),
    (1, 1024, 4096, 4, 2, 128, 256, 3, bf16),      # q_offset = 3072: the last rows of the keys
])
def test_gpu_tile_fwd_dq_against_triton(monkeypatch, shape, programs):
    from attn.common import alloc
    from attn.common.documents import block_table
    from attn.moba import routed, tile_gluon
    from attn.moba.gate import select_blocks
    from attn.moba.op import _routed_index
    B, tq, tk, hq, hkv, d, bs, topk, dt = shape
    q_offset = tk - tq
    q = torch.randn(B, tq, hq, d, device="cuda", dtype=dt)
    k = torch.randn(B, tk, hkv, d, device="cuda", dtype=dt)
    v = torch.randn(B, tk, hkv, d, device="cuda", dtype=dt)
    table = block_table(None, tk, bs, q.device)
    sel = select_blocks(q, k, table, topk, q_offset)
    index = _routed_index(sel, table, topk)
    nsel, scale = topk - 1, d ** -0.5
    op, lp = routed.routed_fwd(q, k, v, index, table, scale * 1.4426950408889634, nsel, bs, False)
    monkeypatch.setattr(alloc, "empty", nan_empty)
    monkeypatch.setattr(moba_fwd_mod, "TILE_IMPL", "triton")
    o_t, lse_t = moba_fwd_mod.fwd_triton(q, k, v, sel, table, scale, q_offset, index, bs, False)
    o_g, lse_g = tile_gluon.tile_fwd_gluon(q, k, v, sel, op, lp, scale * 1.4426950408889634,
                                           q_offset, bs, programs)
    assert torch.isfinite(o_g).all() and torch.isfinite(lse_g).all()
    assert (lse_g - lse_t).abs().max().item() < 2e-3
    err = (o_g.float() - o_t.float()).norm() / o_t.float().norm()
    assert err.item() < 5e-3, err.item()   # 16-bit O, P rounded to 16 bits in another order

    # dQ on the same selection, from the Triton forward's o / lse
    from attn.common.softmax import bwd_delta
    from attn.moba import tile_dq_gluon
    do = torch.randn_like(q)
    delta = bwd_delta(o_t, do)
    dqp = routed.routed_dq(do, q, k, v, lse_t, delta, index, table, scale * 1.4426950408889634,
                           nsel, bs, False)
    monkeypatch.setattr(moba_fwd_mod, "TILE_DQ_IMPL", "triton")
    dq_t = moba_fwd_mod.dq_triton(do, q, k, v, lse_t, delta, sel, table, scale, q_offset, index,
                                  bs, False)
    dq_g = tile_dq_gluon.tile_dq_gluon(do, q, k, v, lse_t, delta, sel, dqp, scale,
                                       scale * 1.4426950408889634, q_offset, bs, programs)
    assert torch.isfinite(dq_g).all()
    err = (dq_g.float() - dq_t.float()).norm() / dq_t.float().norm()
    assert err.item() < 5e-3, err.item()   # 16-bit dQ, dS rounded to 16 bits in another order


@gpu
@pytest.mark.parametrize("case", [
    dict(Tq=8192, Hq=4, Hkv=2, D=128, block=512, topk=3),
    dict(B=2, Tq=2048, Hq=2, Hkv=1, D=64, block=256, topk=4, dtype=torch.float16),
    dict(Tq=1024, Tk=2048, Hq=2, D=128, block=256, topk=3, q_offset=1024),
], ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()).replace("torch.", ""))
def test_gpu_op_against_oracle(monkeypatch, case):
    case = dict(case)
    case.setdefault("dtype", bf16)
    monkeypatch.setattr(moba_fwd_mod, "TILE_IMPL", "gluon")
    monkeypatch.setattr(moba_fwd_mod, "TILE_DQ_IMPL", "gluon")
    rep, _, _ = check_case(monkeypatch, device="cuda", **case)
    print({k: f"{a:.2e} (ref {b:.2e})" for k, (a, b) in rep.items()})
