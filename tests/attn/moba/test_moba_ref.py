"""MoBA's definition (ref.py) against an independent per-query brute force, and its limits:
top-k over all earlier blocks is full causal attention; q_offset shards and documents compose."""
import pytest
import torch

from attn.flash.ref import flash_attn_ref
from attn.moba import MoBACore, moba_attn
from attn.moba.ref import moba_attn_ref


def brute_force(q, k, v, block_size, topk, cu=None, q_offset=0):
    """Loop over queries and heads: the routing rule written out directly (float64)."""
    B, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    bounds = [0, tk] if cu is None else cu.tolist()
    out = torch.zeros(B, tq, hq, d, dtype=torch.float64)
    for b in range(B):
        for i in range(tq):
            p = q_offset + i
            ds = max(s for s in bounds[:-1] if s <= p)
            blk = (p - ds) // block_size
            for h in range(hq):
                kh = h // (hq // hkv)
                qv = q[b, i, h].double()
                scores = []
                for j in range(blk):
                    keys = k[b, ds + j * block_size: ds + (j + 1) * block_size, kh].double()
                    scores.append(((qv * keys.mean(0)).sum().item(), j))
                picked = [j for _, j in sorted(scores, reverse=True)[:max(topk - 1, 0)]]
                idx = list(range(ds + blk * block_size, p + 1))
                for j in picked:
                    idx += list(range(ds + j * block_size, ds + (j + 1) * block_size))
                idx = torch.tensor(sorted(idx))
                s = (k[b, idx, kh].double() @ qv) * d ** -0.5
                out[b, i, h] = s.softmax(0) @ v[b, idx, kh].double()
    return out


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("T,block,topk,hq,hkv", [(37, 8, 3, 4, 2), (64, 16, 2, 2, 2),
                                                 (50, 4, 5, 4, 1), (23, 32, 3, 2, 1)])
def test_matches_brute_force(T, block, topk, hq, hkv):
    q, k, v = torch.randn(1, T, hq, 16), torch.randn(1, T, hkv, 16), torch.randn(1, T, hkv, 16)
    o = moba_attn(q, k, v, block_size=block, topk=topk)
    assert rel(o, brute_force(q, k, v, block, topk)) < 1e-6


def test_documents_and_q_offset_match_brute_force():
    T, cu = 60, torch.tensor([0, 1, 19, 45, 60], dtype=torch.int32)
    q, k, v = torch.randn(1, T, 4, 8), torch.randn(1, T, 2, 8), torch.randn(1, T, 2, 8)
    full = moba_attn(q, k, v, block_size=5, topk=3, cu_seqlens=cu)
    assert rel(full, brute_force(q, k, v, 5, 3, cu)) < 1e-6
    part = moba_attn(q[:, 30:50], k[:, :50], v[:, :50], block_size=5, topk=3,
                     cu_seqlens=torch.tensor([0, 1, 19, 45, 50], dtype=torch.int32), q_offset=30)
    assert rel(part, full[:, 30:50]) < 1e-6  # a CP shard's queries against gathered keys


def test_topk_beyond_the_blocks_is_full_causal_attention():
    q, k, v = torch.randn(1, 45, 4, 16), torch.randn(1, 45, 2, 16), torch.randn(1, 45, 2, 16)
    o = moba_attn(q, k, v, block_size=8, topk=7)  # 6 blocks: every earlier block is taken
    ref, _ = flash_attn_ref(q.double(), k.double(), v.double())
    assert rel(o, ref) < 1e-6


def test_gradients_flow_and_heads_route_independently():
    q = torch.randn(1, 48, 4, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 48, 1, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 48, 1, 8, dtype=torch.float64, requires_grad=True)
    o = moba_attn_ref(q, k, v, block_size=8, topk=2)
    o.square().sum().backward()
    assert all(torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0 for t in (q, k, v))
    # with one KV head shared by 4 query heads, heads still pick different blocks
    from attn.moba.ref import moba_mask
    # (over the 24 last queries: one query's 4 heads agree by chance with probability ~1 %)
    m = moba_mask(q, k, block_size=8, topk=2)[0, :, 24:]   # [head, query, key]
    assert (m != m[:1]).any()


def test_bad_arguments():
    q = torch.randn(1, 8, 3, 4)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        moba_attn(q, torch.randn(1, 8, 2, 4), torch.randn(1, 8, 2, 4))
    with pytest.raises(ValueError, match="topk=0"):
        moba_attn(q, q, q, topk=0)
    with pytest.raises(ValueError, match="q_offset=5"):
        moba_attn(q, q, q, q_offset=5)


def test_core_flops_and_layer():
    core = MoBACore(64, 4, 2, block_size=16, topk=3)
    y = core(torch.randn(2, 40, 64))
    assert y.shape == (2, 40, 64)
    # short: the causal half (32 keys); long: half a block + 2 blocks = 40 keys, plus the gate
    assert core.attention_flops_per_token(64) == 4 * 16 * 4 * 32 + 2 * 16 * 4 * 64 / 16
    assert core.attention_flops_per_token(1 << 20) == 4 * 16 * 4 * 40 + 2 * 16 * 4 * (1 << 20) / 16
