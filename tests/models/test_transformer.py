"""Model: shapes, causal and document masking, RoPE positions, chunked loss, overfitting."""
import math

import pytest
import torch
import torch.nn.functional as F

from models import ModelConfig, Transformer, chunked_cross_entropy


def tiny(**kw):
    base = dict(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256,
                loss_chunk=16)
    base.update(kw)
    return Transformer(ModelConfig(**base))


def positions(B, T):
    return torch.arange(T).expand(B, T)


def test_shapes_and_gqa_layout():
    m = tiny()
    ids = torch.randint(0, 97, (3, 20))
    logits = m(ids, positions(3, 20))
    assert logits.shape == (3, 20, 97)
    attn = m.layers[0].attn
    assert attn.wk.weight.shape == (2 * 16, 64) and attn.wq.weight.shape == (4 * 16, 64)


def test_causal_future_tokens_do_not_change_past_logits():
    m = tiny().eval()
    ids = torch.randint(0, 97, (2, 30))
    ids2 = ids.clone()
    ids2[:, 20:] = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        a, b = m(ids, positions(2, 30)), m(ids2, positions(2, 30))
    torch.testing.assert_close(a[:, :20], b[:, :20], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a[:, 20:], b[:, 20:])


def test_document_mask_equals_separate_documents():
    """A packed row with cu_seqlens and restarting positions equals running each doc alone."""
    m = tiny().eval()
    lens = [7, 1, 12, 4]
    docs = [torch.randint(0, 97, (1, n)) for n in lens]
    ids = torch.cat(docs, dim=1)
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    with torch.no_grad():
        packed = m(ids, pos, cu_seqlens=cu)
        alone = torch.cat([m(d, positions(1, d.shape[1])) for d in docs], dim=1)
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


def test_document_mask_with_batch_flattened():
    """B > 1 with cu_seqlens over the flattened B*T tokens matches per-row calls."""
    m = tiny().eval()
    ids = torch.randint(0, 97, (2, 10))
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 5, 6], [3, 4, 0, 1, 2, 3, 4, 5, 6, 7]])
    cu = torch.tensor([0, 3, 10, 12, 20], dtype=torch.int32)
    with torch.no_grad():
        both = m(ids, pos, cu_seqlens=cu)
        row0 = m(ids[:1], pos[:1], cu_seqlens=torch.tensor([0, 3, 10], dtype=torch.int32))
        row1 = m(ids[1:], pos[1:], cu_seqlens=torch.tensor([0, 2, 10], dtype=torch.int32))
    torch.testing.assert_close(both, torch.cat([row0, row1]), rtol=1e-5, atol=1e-5)


def test_rope_uses_batch_positions():
    """Shifting every position by a constant leaves attention scores (and outputs) unchanged,
    while permuting positions does not: RoPE is relative and read from the batch."""
    m = tiny().eval()
    ids = torch.randint(0, 97, (1, 16))
    with torch.no_grad():
        a = m(ids, positions(1, 16))
        b = m(ids, positions(1, 16) + 1000)
        c = m(ids, positions(1, 16).flip(-1))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(a, c, atol=1e-3)


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_cross_entropy_matches_full(chunk):
    h = torch.randn(3, 21, 32, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 32, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 50, (3, 21))
    y[0, :5] = -100
    loss, n = chunked_cross_entropy(h, w, y, chunk)
    ref = F.cross_entropy((h @ w.t()).reshape(-1, 50), y.reshape(-1), ignore_index=-100, reduction="sum")
    assert int(n) == 3 * 21 - 5
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-6)
    g1 = torch.autograd.grad(loss, (h, w))
    g2 = torch.autograd.grad(ref, (h, w))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_layer_pattern_and_flops():
    m = tiny(n_layers=4, layer_pattern=["sdpa"])
    assert m.cfg.layer_families() == ["sdpa"] * 4
    n = m.num_params(exclude_embedding=True) + m.embed.weight.numel()  # tied head counted
    expected = 3 * (2 * n + 4 * 2 * 128 * 16 * 4)  # 6N + causal attention at T = 128
    assert math.isclose(m.flops_per_token(128), expected)


def test_bad_heads_message():
    with pytest.raises(ValueError, match=r"n_kv_heads=3 .*n_heads=4"):
        tiny(n_kv_heads=3)


def test_unknown_family_lists_valid_ones():
    with pytest.raises(ValueError, match="valid: .*sdpa"):
        tiny(layer_pattern=["nope"])


def test_tiny_model_overfits_a_batch():
    torch.manual_seed(0)
    m = tiny(n_layers=2, dim=64)
    ids = torch.randint(0, 97, (2, 33))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    for _ in range(150):
        s, n = m(ids[:, :-1], positions(2, 32), labels=ids[:, 1:])
        (s / n).backward()
        opt.step()
        opt.zero_grad()
    assert (s / n).item() < 0.1, (s / n).item()  # from ln(97) = 4.57
