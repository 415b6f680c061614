"""attn.common.checks: every rule of check_qkv raises a ValueError naming the function, the
argument and the rule; valid inputs pass."""
from __future__ import annotations

import pytest
import torch

from attn.common.checks import check_cu_values, check_qkv, cu_seqlens_list


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


Q, KV = _t(1, 8, 4, 16), _t(1, 8, 2, 16)
CU = torch.tensor([0, 3, 8], dtype=torch.int32)


@pytest.mark.parametrize("args,kw,match", [
    ((_t(8, 4, 16), KV, KV), {}, "fn: q must be a 4-D tensor"),
    ((Q, KV, _t(1, 8, 2, 32)), {}, "k .* and v .* must have the same shape"),
    ((_t(1, 8, 4, 32), KV, KV), {}, "agree on batch .* and head dim"),
    ((_t(1, 8, 3, 16), KV, KV), {}, "GQA: Hq=3 .* multiple of Hkv=2"),
    ((Q, _t(1, 8, 1, 16), _t(1, 8, 1, 16)), dict(max_group=2), "group size Hq/Hkv <= 2"),
    ((Q, KV, KV), dict(one_head_count=True), "one head count"),
    ((Q, KV.half(), KV), {}, "share one dtype"),
    ((Q.long(), KV.long(), KV.long()), {}, "one floating dtype"),
    ((Q, KV, KV), dict(q_offset=1), "q_offset=1 must be an int"),
    ((Q, KV, KV), dict(q_offset=-1), "q_offset=-1"),
    ((Q, KV, KV), dict(window=0), "window=0"),
    ((Q, KV, KV), dict(cu_seqlens=CU.long()), "cu_seqlens must be a 1-D int32"),
    ((Q, KV, KV), dict(cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32)), "end at T=8"),
    ((Q, KV, KV), dict(cu_seqlens=torch.tensor([0, 5, 3, 8], dtype=torch.int32)),
     "non-decreasing"),
    ((Q.double(), KV.double(), KV.double()), dict(head_dims=(16,)), "dtype torch.float64"),
    ((Q, KV, KV), dict(head_dims=(32,)), "head dim D=16"),
    ((_t(1, 4, 8, 16).transpose(1, 2), KV, KV), dict(contiguous=True), "q must be contiguous"),
])
def test_rules(args, kw, match):
    with pytest.raises(ValueError, match=match):
        check_qkv("fn", *args, **kw)


def test_names_and_valid_inputs():
    with pytest.raises(ValueError, match="k_cmp .* and v_cmp .* must have the same shape"):
        check_qkv("cmp_attn", Q, KV, _t(1, 8, 2, 32), names=("q", "k_cmp", "v_cmp"))
    check_qkv("fn", Q, KV, KV, q_offset=0, window=3, cu_seqlens=CU, head_dims=(16,),
              contiguous=True)
    check_qkv("fn", _t(2, 8, 2, 16), KV.expand(2, -1, -1, -1), KV.expand(2, -1, -1, -1),
              cu_seqlens=None)
    # cu_values=False: the layout rules only (the caller checks the values)
    check_qkv("fn", Q, KV, KV, cu_seqlens=torch.tensor([0, 9], dtype=torch.int32),
              cu_values=False)


def test_cu_value_helpers():
    assert cu_seqlens_list(CU, 8) == [0, 3, 8]
    with pytest.raises(ValueError, match="f: cu_seqlens must start at 0 and end at T=9"):
        cu_seqlens_list(CU, 9, "f: ")
    check_cu_values(CU, 8)
    check_cu_values(None, 8)
    with pytest.raises(ValueError, match="non-decreasing"):
        check_cu_values(torch.tensor([0, 5, 3, 8], dtype=torch.int32), 8)
