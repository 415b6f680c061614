"""Activation checkpointing recomputes blocks without changing loss, gradients or names."""
import copy

import torch

from models import ModelConfig, Transformer
from parallel.wrappers import BlockWrapping as W, apply_block_wrappers


def test_activation_checkpointing_is_exact():
    model = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=3, n_heads=4, n_kv_heads=2))
    ac = copy.deepcopy(model)
    apply_block_wrappers(ac, W(activation_checkpointing=True, compile=False))
    assert list(ac.state_dict()) == list(model.state_dict())
    ids = torch.randint(0, 64, (2, 17))
    pos = torch.arange(16).expand(2, 16)
    cu = torch.tensor([0, 5, 16, 32], dtype=torch.int32)
    calls = []
    for m in (model, ac):
        inner = m.layers[1].ffn.forward
        m.layers[1].ffn.forward = lambda x, inner=inner, m=m: calls.append(m is ac) or inner(x)
    losses = []
    for m in (model, ac):
        s, n = m(ids[:, :-1], pos, ids[:, 1:], cu)
        (s / n).backward()
        losses.append(s.item())
    assert losses[0] == losses[1]
    assert calls == [False, True, True]  # the checkpointed block ran again in backward
    for p, q in zip(model.parameters(), ac.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
