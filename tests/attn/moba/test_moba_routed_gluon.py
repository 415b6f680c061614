"""MoBA's Gluon routed forward and dQ (attn/moba/routed_gluon.py, routed_dq_gluon.py;
MOBA_ROUTED_IMPL, MOBA_ROUTED_DQ_IMPL). CPU: the settings, the refusal off Hopper (their compile
for sm_90a is in tests/attn/flash/gluon_aot.py). GPU (`pytest -m gpu`): OP / LP and DQP against
routed.py's Triton kernels (1, 2 and 4 programs per block and head, each walking its chunks
through the two-slot ring), the op with them against the float64 definition (moba_testlib's
rules), with the Gluon dK/dV kernel too."""
from __future__ import annotations

import pytest
import torch

from attn.moba import bwd as moba_bwd
from attn.moba import routed
from import_refusal import assert_import_refuses
from moba_testlib import check_case

bf16 = torch.bfloat16


def test_unknown_setting_refused():
    assert_import_refuses("attn.moba.routed", "MOBA_ROUTED_IMPL", "x", "MOBA_ROUTED_IMPL='x'")
    assert_import_refuses("attn.moba.routed", "MOBA_ROUTED_DQ_IMPL", "x",
                          "MOBA_ROUTED_DQ_IMPL='x'")


def test_off_hopper_raises(monkeypatch):
    monkeypatch.setattr(routed, "ROUTED_IMPL", "gluon")
    q = torch.zeros(1, 256, 2, 128, dtype=bf16)
    with pytest.raises(ValueError, match="MOBA_ROUTED_IMPL=gluon: .*Hopper"):
        routed._routed_gluon(q, q, 128, False)
    monkeypatch.setattr(routed, "ROUTED_IMPL", "auto")
    assert not routed._routed_gluon(q, q, 128, False)
    monkeypatch.setattr(routed, "ROUTED_DQ_IMPL", "gluon")
    with pytest.raises(ValueError, match="MOBA_ROUTED_DQ_IMPL=gluon: .*Hopper"):
        routed._routed_dq_gluon(q, q, 128, False)
    monkeypatch.setattr(routed, "ROUTED_DQ_IMPL", "auto")
    assert not routed._routed_dq_gluon(q, q, 128, False)


gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("split", [1, 2, 4])
@pytest.mark.parametrize("shape", [(1, 8192, 4, 2, 128, 512, 3), (2, 2048, 4, 4, 64, 256, 4),
                                   (1, 4096, 2, 1, 128, 128, 8)])
def test_gpu_partials_against_triton(monkeypatch, shape, split):
    """OP / LP of every chosen entry against the Triton kernel (outputs poisoned first: NaN
    where an entry is left unwritten)."""
    from attn.common.documents import block_table
    from attn.moba import routed_gluon
    from attn.moba.gate import select_blocks
    from attn.moba.op import _routed_index
    B, T, hq, hkv, d, bs, topk = shape
    q = torch.randn(B, T, hq, d, device="cuda", dtype=bf16)
    k = torch.randn(B, T, hkv, d, device="cuda", dtype=bf16)
    v = torch.randn(B, T, hkv, d, device="cuda", dtype=bf16)
    table = block_table(None, T, bs, q.device)
    sel = select_blocks(q, k, table, topk, 0)
    index = _routed_index(sel, table, topk)
    nsel, s2 = topk - 1, d ** -0.5 * 1.4426950408889634
    op_t, lp_t = routed.routed_fwd(q, k, v, index, table, s2, nsel, bs, True)  # Triton
    op_g = torch.full_like(op_t, float("nan"))
    lp_g = torch.full_like(lp_t, float("nan"))
    routed_gluon.routed_fwd_gluon(q, k, v, index, table[2].numel(), nsel, s2, bs, op_g, lp_g,
                                  split)
    # entries nobody chose (unused slots) are written by neither: compare the chosen ones
    used = (sel >= 0).reshape(B * hq, T * nsel)
    assert (lp_g[used] - lp_t[used]).abs().max().item() < 1e-3
    err = (op_g[used].float() - op_t[used].float()).norm() / op_t[used].float().norm()
    assert err.item() < 5e-3, err.item()   # bf16 outputs, P rounded to bf16 in another order


@gpu
@pytest.mark.parametrize("split", [1, 2, 4])
@pytest.mark.parametrize("shape", [(1, 8192, 4, 2, 128, 512, 3), (2, 2048, 4, 4, 64, 256, 4),
                                   (1, 4096, 2, 1, 128, 128, 8)])
def test_gpu_dq_partials_against_triton(shape, split):
    """DQP of every chosen entry against the Triton kernel (poisoned first, as above)."""
    from attn.common.softmax import bwd_delta
    from attn.moba import routed_dq_gluon
    from attn.moba.op import moba_fwd
    B, T, hq, hkv, d, bs, topk = shape
    q = torch.randn(B, T, hq, d, device="cuda", dtype=bf16)
    k = torch.randn(B, T, hkv, d, device="cuda", dtype=bf16)
    v = torch.randn(B, T, hkv, d, device="cuda", dtype=bf16)
    do = torch.randn_like(q)
    o, lse, sel, table, index = moba_fwd(q, k, v, block_size=bs, topk=topk)
    delta = bwd_delta(o, do)
    nsel, s2 = topk - 1, d ** -0.5 * 1.4426950408889634
    dqp_t = routed.routed_dq(do, q, k, v, lse, delta, index, table, s2, nsel, bs, True)
    dqp_g = torch.full_like(dqp_t, float("nan"))
    routed_dq_gluon.routed_dq_gluon(do, q, k, v, lse, delta, index, table[2].numel(), nsel, s2,
                                    bs, dqp_g, split)
    used = (sel >= 0).reshape(B * hq, T * nsel)
    err = (dqp_g[used].float() - dqp_t[used].float()).norm() / dqp_t[used].float().norm()
    assert err.item() < 5e-3, err.item()   # bf16 outputs, dS rounded to bf16 in another order


@gpu
@pytest.mark.parametrize("case", [
    dict(Tq=8192, Hq=4, Hkv=2, D=128, block=512, topk=3),
    dict(B=2, Tq=2048, Hq=2, Hkv=1, D=64, block=256, topk=4, dtype=torch.float16),
], ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()).replace("torch.", ""))
def test_gpu_op_against_oracle(monkeypatch, case):
    case = dict(case)
    case.setdefault("dtype", bf16)
    monkeypatch.setattr(routed, "ROUTED_IMPL", "gluon")
    monkeypatch.setattr(routed, "ROUTED_DQ_IMPL", "gluon")
    monkeypatch.setattr(moba_bwd, "DKDV_IMPL", "gluon")
    rep, _, _ = check_case(monkeypatch, device="cuda", **case)
    print({k: f"{a:.2e} (ref {b:.2e})" for k, (a, b) in rep.items()})
