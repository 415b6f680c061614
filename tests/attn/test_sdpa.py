"""The sdpa family against the dense-mask definition: documents, q_offset, window, GQA."""
import pytest
import torch

from attn import available, get_core
from attn.masks import causal_mask
from attn.sdpa import sdpa_attn


def dense_ref(q, k, v, mask, scale):
    g = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
    s = s.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v.double())


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


def test_registry():
    assert "sdpa" in available()
    assert get_core("sdpa").family == "sdpa"
