"""`attn=nsa`: Native Sparse Attention (compressed, selected and sliding-window branches, gated;
`attn.window=0` drops the sliding-window branch: the two-branch NSA of fla's parallel_nsa).

Public `nsa_attn` (Triton kernels on CUDA tensors, the dense reference on CPU: see op.py), the
compression helper `compress`, and the layer core `NSACore`; context parallelism works through
`allgather` (per-shard selection with q_offset) and `ulysses`.

Under context parallelism the branch gates travel as a named per-query input (`gates=`, see
attn/base.py), which every strategy moves exactly as it moves q. The compressed K/V are computed
inside `attend` from the k, v it receives (the whole sequence under ulysses, the gathered prefix
[0, end) under allgather, whose complete blocks are exactly those its queries can see), so the
compression MLP's gradients also come out right on every rank.
"""
from __future__ import annotations

import torch
from torch import nn

from attn.base import SoftmaxAttention
from attn.nsa.op import compress, nsa_attn
from attn.nsa.ref import cmp_cu_seqlens, nsa_attn_ref



class BlockCompressor(nn.Module):
    """φ of the paper: one block of cmp_block keys (or values) [.., cmp_block, H, D] -> [.., H, D].

    `mlp`: mean of the block plus an MLP over the flattened block with a learned intra-block
    position embedding (the mean keeps the compressed keys on the scale of the keys at init;
    the MLP learns the rest). Shared by all heads (so Ulysses' head sharding needs nothing).
    `mean`: mean pooling, no parameters."""

    def __init__(self, cmp_block: int, head_dim: int, kind: str = "mlp"):
        super().__init__()
        if kind not in ("mlp", "mean"):
            raise ValueError(f"attn.compress={kind!r} must be 'mlp' or 'mean'")
        self.kind = kind
        if kind == "mlp":
            self.pos = nn.Parameter(torch.zeros(cmp_block, head_dim))
            self.fc1 = nn.Linear(cmp_block * head_dim, head_dim, bias=False)
            self.fc2 = nn.Linear(head_dim, head_dim, bias=False)

    def forward(self, blocks: torch.Tensor) -> torch.Tensor:
        mean = blocks.mean(-3)
        if self.kind == "mean":
            return mean
        x = blocks + self.pos[:, None, :].to(blocks.dtype)             # [.., cb, H, D]
        x = x.movedim(-3, -2).flatten(-2)                               # [.., H, cb·D]
        return mean + self.fc2(nn.functional.silu(self.fc1(x)))

    def flops_per_block(self) -> float:
        return 0.0 if self.kind == "mean" else 2.0 * (self.fc1.weight.numel()
                                                      + self.fc2.weight.numel())


class NSACore(SoftmaxAttention):
    """Softmax-attention layer with the NSA branches (three; two with window = 0) and sigmoid
    gates from the input, one per branch."""

    family = "nsa"
    cp_capabilities = frozenset({"head_parallel", "gather_kv"})
    cp_default = "allgather"  # per-shard selection: each rank selects for its own queries

    def __init__(self, dim, n_heads, n_kv_heads, head_dim=None, layer_idx=0, n_layers=1, *,
                 cmp_block: int = 32, cmp_stride: int = 16, sel_block: int = 64, topk: int = 16,
                 window: int = 512, compress: str = "mlp", qk_norm: bool = False):
        super().__init__(dim, n_heads, n_kv_heads, head_dim, layer_idx, n_layers, qk_norm=qk_norm)
        if not 1 <= cmp_stride <= cmp_block:
            raise ValueError(f"attn.cmp_block={cmp_block}, attn.cmp_stride={cmp_stride}: need "
                             "1 <= cmp_stride <= cmp_block")
        if topk < 3:
            raise ValueError(f"attn.topk={topk} must be >= 3 (block 0 and the two most recent "
                             "blocks are always selected)")
        if sel_block < 1:
            raise ValueError(f"attn.sel_block={sel_block} must be >= 1")
        if window < 0:
            raise ValueError(f"attn.window={window} must be >= 1, or 0 for no sliding-window "
                             "branch")
        self.cmp_block, self.cmp_stride, self.sel_block = cmp_block, cmp_stride, sel_block
        self.topk, self.window = topk, window
        self.n_gates = 3 if window else 2   # cmp, slc (, swa)
        self.compress_k = BlockCompressor(cmp_block, self.head_dim, compress)
        self.compress_v = BlockCompressor(cmp_block, self.head_dim, compress)
        self.w_gate = nn.Linear(dim, self.n_gates * n_heads, bias=False)

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, Hq, n_gates] in (0, 1): sigmoid gates for the cmp, slc (and swa) branches."""
        B, T, _ = x.shape
        return torch.sigmoid(self.w_gate(x)).view(B, T, self.n_heads, self.n_gates)

    def forward(self, x: torch.Tensor, rope=None, cu_seqlens=None) -> torch.Tensor:
        B, T, _ = x.shape
        hd = self.head_dim
        q = self.wq(x).view(B, T, self.n_heads, hd)
        k = self.wk(x).view(B, T, self.n_kv_heads, hd)
        v = self.wv(x).view(B, T, self.n_kv_heads, hd)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope(q), rope(k)
        gates = self.gates(x).to(q.dtype)
        if cu_seqlens is not None and B > 1:
            q, k, v, gates = (t.reshape(1, B * T, *t.shape[2:]) for t in (q, k, v, gates))
        o = self.attend(q, k, v, cu_seqlens, gates=gates)
        return self.wo(o.reshape(B, T, self.n_heads * hd))

    def compress_kv(self, k, v, cu_seqlens=None):
        """(k_cmp, v_cmp) of k, v [B, T, Hkv, D] in the layout of attn/nsa/ref.py."""
        fns = {"k": self.compress_k, "v": self.compress_v}
        return compress(k, v, self.cmp_block, self.cmp_stride, cu_seqlens=cu_seqlens,
                        fn=lambda blocks, which: fns[which](blocks))

    def attend(self, q, k, v, cu_seqlens=None, *, q_offset=0, heads=None, gates):
        """gates [B, Tq, Hq, n_gates]: this core's sigmoid gates of the cmp, slc (and swa) branches
        (so non-negative). Compressed K/V come from the k, v given here. `heads` is ignored: the
        compressor is shared by all heads and the gates arrive with q's heads."""
        if gates.shape[:3] != q.shape[:3] or gates.shape[-1] != self.n_gates:
            raise ValueError(f"gates {tuple(gates.shape)} must be [B, Tq, Hq, {self.n_gates}] "
                             f"like q {tuple(q.shape[:3])}")
        k_cmp, v_cmp = self.compress_kv(k, v, cu_seqlens)
        g_swa = gates[..., 2] if self.window else None
        return nsa_attn(q, k, v, k_cmp, v_cmp, gates[..., 0], gates[..., 1], g_swa,
                        cmp_block=self.cmp_block, cmp_stride=self.cmp_stride,
                        sel_block=self.sel_block, topk=self.topk, window=self.window,
                        scale=self.scale, cu_seqlens=cu_seqlens, q_offset=q_offset,
                        gates_nonneg=True)

    def attention_flops_per_token(self, seq_len: int) -> float:
        """Keys per query, 4·D FLOPs each per query head: compressed (T/cmp_stride/2 on average),
        selected (topk·sel_block, at most the causal T/2) and window (at most T/2; none at 0);
        plus the compression MLPs, per compressed block (one every cmp_stride tokens) per KV
        head, for k and v. (The model's dense term also counts those weights once per token.)"""
        t = float(seq_len)
        keys = (t / self.cmp_stride / 2 + min(t / 2, self.topk * self.sel_block)
                + min(t / 2, self.window))
        mlp = (self.compress_k.flops_per_block() + self.compress_v.flops_per_block()) \
            * self.n_kv_heads / self.cmp_stride
        return 4.0 * self.head_dim * self.n_heads * keys + mlp


__all__ = ["nsa_attn", "nsa_attn_ref", "compress", "cmp_cu_seqlens", "NSACore"]
