"""attn/common/customop.py: eager calls of the families' custom ops run their bodies through an
autograd.Function, compiled code traces the ops. Both paths must give the same bits: each
family's public op (Triton kernels under the interpreter, fresh inputs) eagerly and with
torch.compile's flag raised (then the custom op runs, eagerly), outputs and every gradient
compared exactly; and the eager path must not be the op's (its autograd node names it)."""
from __future__ import annotations

import pytest
import torch

from attn.flash import flash_attn
from attn.lightning import lightning_attn
from attn.moba import moba_attn
from attn.nsa import nsa_attn
from attn.nsa.op import compress


def _flash(q, k, v, extra):
    return flash_attn(q, k, v, return_lse=True)


def _moba(q, k, v, extra):
    return moba_attn(q, k, v, block_size=16, topk=2)


def _nsa(q, k, v, extra):
    g = extra.sigmoid()
    kc, vc = compress(k, v, 16, 8)
    return nsa_attn(q, k, v, kc, vc, g[..., 0], g[..., 1], g[..., 2], cmp_block=16, cmp_stride=8,
                    sel_block=16, topk=3, window=16)


def _lightning(q, k, v, extra):
    return lightning_attn(q, k, v, torch.linspace(0.1, 0.5, q.shape[2]), output_final_state=True)


FAMILIES = {"flash": (_flash, "flash_fwd"), "moba": (_moba, "moba_fwd"),
            "nsa": (_nsa, "nsa_fwd"), "lightning": (_lightning, "scan_fwd")}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_eager_body_matches_op(monkeypatch, family):
    monkeypatch.setenv("ATTN_IMPL", "triton")
    fn, name = FAMILIES[family]
    T, H, D = 64, 2, 16
    base = [torch.randn(1, T, H, D) for _ in range(3)] + [torch.randn(1, T, H, 3)]

    def run():
        leaves = [t.clone().requires_grad_() for t in base]
        out = fn(*leaves)
        outs = [t for t in (out if isinstance(out, tuple) else (out,)) if t is not None]
        loss = sum((t.float() * torch.randn(t.shape, generator=torch.Generator().manual_seed(i)))
                   .sum() for i, t in enumerate(outs))
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        return outs, [g for g in grads if g is not None], type(outs[0].grad_fn).__name__

    outs_e, grads_e, node_e = run()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    outs_o, grads_o, node_o = run()
    assert node_e == f"Eager_{name}_bodyBackward", node_e
    assert node_o != node_e, node_o
    assert len(grads_e) == len(grads_o) >= 3
    for a, b in zip(outs_e + grads_e, outs_o + grads_o):
        assert torch.equal(a, b)
