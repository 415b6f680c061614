"""Public op of `attn=lightning` (Lightning Attention-2): linear attention with a per-head decay.

    lightning_attn(q, k, v, slopes, *, scale=None, initial_state=None, output_final_state=False,
                   cu_seqlens=None) -> (o, final_state | None)
    lightning_fwd(q, k, v, slopes, initial_state=None, *, scale=None, cu_seqlens=None)
        -> (o, final_state)                                   (no autograd; LASP's forward step)
    lightning_bwd(do, q, k, v, slopes, initial_state=None, d_final_state=None, *, scale=None,
                  cu_seqlens=None) -> (dq, dk, dv, d_initial_state)    (LASP's backward step)
`fwd` / `bwd` are aliases. S_t = exp(-slopes[h]) S_{t-1} + k_t^T v_t, o_t = scale q_t S_t; slopes
fp32 [H] >= 0 (0 gives plain linear attention), not differentiated. Shapes, dtypes, dispatch
(Triton on CUDA, reference on CPU, ATTN_IMPL) and the kernels are those of attn/linear/op.py.
"""
from __future__ import annotations

from attn.linear.op import scan_attn, scan_bwd, scan_fwd


def lightning_attn(q, k, v, slopes, *, scale=None, initial_state=None, output_final_state=False,
                   cu_seqlens=None):
    """Causal linear attention with decay exp(-slopes[h]) per step; see the module docstring."""
    return scan_attn("lightning_attn", q, k, v, slopes, scale, initial_state, output_final_state,
                     cu_seqlens, decay=True)


def lightning_fwd(q, k, v, slopes, initial_state=None, *, scale=None, cu_seqlens=None):
    """CP primitive: (o, final_state fp32), no autograd."""
    return scan_fwd("lightning_fwd", q, k, v, slopes, initial_state, scale, cu_seqlens,
                    decay=True)


def lightning_bwd(do, q, k, v, slopes, initial_state=None, d_final_state=None, *, scale=None,
                  cu_seqlens=None):
    """CP primitive: (dq, dk, dv, d_initial_state) of lightning_fwd given do and d final_state."""
    return scan_bwd("lightning_bwd", do, q, k, v, slopes, initial_state, d_final_state, scale,
                    cu_seqlens, decay=True)


fwd, bwd = lightning_fwd, lightning_bwd
