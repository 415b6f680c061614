"""Reference of `lightning_attn` (the definition and the CPU path), on the shared code of
attn/linear/ref.py: S_t = exp(-slopes[h]) S_{t-1} + k_t^T v_t, o_t = scale q_t S_t.

    lightning_recurrent(q, k, v, slopes, *, scale, initial_state, cu_seqlens) -> (o, state)
        token by token (float64 when given float64: the test oracle)
    lightning_chunked(q, k, v, slopes, *, scale, initial_state, cu_seqlens) -> (o, state)
        chunks of 64 tokens, autograd-friendly (what `lightning_attn` runs on CPU tensors)
"""
from __future__ import annotations

from attn.linear import ref as _ref


def lightning_recurrent(q, k, v, slopes, *, scale=None, initial_state=None, cu_seqlens=None):
    return _ref.recurrent(q, k, v, slopes, scale=scale, initial_state=initial_state,
                          cu_seqlens=cu_seqlens)


def lightning_chunked(q, k, v, slopes, *, scale=None, initial_state=None, cu_seqlens=None):
    return _ref.chunked(q, k, v, slopes, scale=scale, initial_state=initial_state,
                        cu_seqlens=cu_seqlens)
