"""`attn=sdpa`: softmax attention through torch's own attention ops (baseline).

Which torch op runs (all compute the contract's causal softmax, per document):
- plain causal (no documents, q_offset 0, no window, Tq == Tk): one
  `scaled_dot_product_attention(is_causal=True)` call; on CUDA torch dispatches it to its
  FlashAttention-2 / cuDNN kernels.
- CUDA with documents, q_offset or a window: FlexAttention with a block-sparse mask built from
  cu_seqlens on the device (attn/sdpa/flex.py): no host sync, no Python loop over documents, no
  O(T²) mask, and traceable by torch.compile.
- CPU (FlexAttention has no CPU backward): documents alone in eager mode run one SDPA call per
  document (no O(T²) mask; `.tolist()` is a cheap host read on CPU); under torch.compile, or
  with q_offset / window, one SDPA call with the dense boolean mask (tensor ops only, so the
  compiled graph does not break; O(T²), the CPU path is for short sequences).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from attn.base import SoftmaxAttention
from attn.common.checks import check_qkv
from attn.masks import causal_mask
from attn.sdpa.flex import flex_sdpa

# dtypes FlexAttention's CUDA kernels take; others (float64) use the dense-mask SDPA call
_FLEX_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _sdpa(q, k, v, scale, is_causal=False, mask=None):
    # torch wants [B, H, T, D]; GQA via enable_gqa (no repeated K/V in memory)
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
        is_causal=is_causal, scale=scale, enable_gqa=q.shape[2] != k.shape[2])
    return o.transpose(1, 2)


def sdpa_per_document(q, k, v, scale, cu_seqlens):
    """One causal SDPA call per document (the CPU eager path, and the GPU benchmark's baseline):
    reads the boundaries on the host."""
    bounds = cu_seqlens.tolist()
    outs = [_sdpa(q[:, s:e], k[:, s:e], v[:, s:e], scale, is_causal=True)
            for s, e in zip(bounds[:-1], bounds[1:]) if e > s]
    return torch.cat(outs, dim=1)


def sdpa_attn(q, k, v, *, scale=None, cu_seqlens=None, q_offset: int = 0, window=None):
    """Causal softmax attention, [B, T, H, D] layout, per the contract in docs/design.md."""
    # on CUDA the FlexAttention path checks cu_seqlens' values when it builds a mask (once
    # per batch), so the check here reads no device value
    check_qkv("sdpa_attn", q, k, v, q_offset=q_offset, window=window, cu_seqlens=cu_seqlens,
              cu_values=not q.is_cuda)
    B, tq, _, D = q.shape
    tk = k.shape[1]
    scale = D ** -0.5 if scale is None else scale
    if cu_seqlens is None and window is None and q_offset == 0 and tq == tk:
        return _sdpa(q, k, v, scale, is_causal=True)
    if q.is_cuda and q.dtype in _FLEX_DTYPES:
        # validates cu_seqlens when it builds a mask (once per batch in eager mode)
        return _flex_outside_graph(q, k, v, scale, cu_seqlens=cu_seqlens, q_offset=q_offset,
                                   window=window)
    if (cu_seqlens is not None and window is None and q_offset == 0 and tq == tk
            and not torch.compiler.is_compiling()):
        return sdpa_per_document(q, k, v, scale, cu_seqlens)
    mask = causal_mask(tq, tk, q_offset, cu_seqlens, window, device=q.device)
    return _sdpa(q, k, v, scale, mask=mask)


# Inside a compiled block, FlexAttention with its block mask traced into the same graph returned
# zeros on torch 2.11 (H200, tests/attn/test_sdpa.py::test_gpu_compiled_region_matches_eager):
# the call runs outside the block's graph instead (a graph break), through the separately
# compiled FlexAttention with the cached mask, as in eager mode.
_flex_outside_graph = torch.compiler.disable(flex_sdpa)


class SDPACore(SoftmaxAttention):
    """Softmax attention layer whose op is torch SDPA (FlexAttention for documents on CUDA)."""

    family = "sdpa"
    # torch's SDPA returns no log-sum-exp to merge partial blocks through, so no ring; under
    # allgather every query chunk runs SDPA against the gathered key prefix
    cp_capabilities = frozenset({"head_parallel", "gather_kv"})
    cp_default = "allgather"

    def attend(self, q, k, v, cu_seqlens=None, *, q_offset=0, heads=None):
        return sdpa_attn(q, k, v, scale=self.scale, cu_seqlens=cu_seqlens, q_offset=q_offset)


__all__ = ["sdpa_attn", "sdpa_per_document", "SDPACore"]
