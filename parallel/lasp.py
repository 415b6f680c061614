"""`lasp` context parallelism for the linear families (linear, lightning), LASP-2 style.

A chunk of the sequence maps an incoming state S to  S_out = A·S + B  with A = exp(−slope·n)
per head (n tokens; 1 for plain linear attention; 0 when a document starts inside the chunk,
since the state resets) and B its own final state from a zero start. So:
1. each rank computes its chunks' B from a zero state (the op's state-only pass, about a fifth
   of a forward);
2. one all-gather of the B's (H·Dk·Dv fp32 per chunk); every rank forms the prefix
   S_in[c] = A_{c−1}·S_in[c−1] + B_{c−1} over chunks in sequence order;
3. each rank reruns its chunks from S_in (the op's `initial_state`) for the outputs.
The all-gather's backward reduce-scatters the state gradients: the suffix combination of the
backward pass comes from autograd. Zigzag works unchanged (chunks are combined in sequence
order, wherever they live), and so does any placement (parallel/sharding.py): under a Ulysses
degree u the group is the outer group of cp/u members, each holding 2u (zigzag) or u chunks
for H/u heads (`heads=` selects the decays). Bytes per layer and rank: n_chunks·H·Dk·Dv·4
(H/u heads under Ulysses), independent of T.

Cores provide `attend_with_state(q, k, v, cu_seqlens, initial_state, heads=None) -> (o, S)`,
`final_state(k, v, cu_seqlens, initial_state, heads=None) -> S` (S: fp32 [N_docs, H, Dk, Dv])
and `log_decay() -> [H]` (per-token log decay, ≤ 0).
"""
from __future__ import annotations

import torch

from parallel.comm import gather_seq
from parallel.sharding import SeqGroup


def local_cu_seqlens(cu: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Document boundaries of tokens [start, end), relative to start."""
    inner = cu[(cu > start) & (cu < end)] - start
    return torch.cat([inner.new_tensor([0]), inner, inner.new_tensor([end - start])]).to(torch.int32)


def make_lasp_attend(core, seq: SeqGroup):
    n_chunks = seq.placement.n_chunks
    chunk_of = [c for member in seq.placement.members for c in member]  # all-gather order

    def cp_attend(q, k, v, cu_seqlens=None, **kwargs):
        total = int(cu_seqlens[-1])
        starts = set(cu_seqlens.tolist())
        mine = seq.bounds(total)
        pieces, at = [], 0
        for s, e in mine:
            pieces.append((s, e, slice(at, at + e - s), local_cu_seqlens(cu_seqlens, s, e)))
            at += e - s
        # 1. own contribution of every local chunk, from a zero state
        finals = []
        for s, e, sl, cu_loc in pieces:
            state = core.final_state(k[:, sl], v[:, sl], cu_loc, None, **kwargs)
            finals.append(state[-1])                       # the last document carries on
        # 2. all-gather the chunk states (member order) and put them in sequence order
        local = torch.stack(finals)[None]                  # [1, chunks_per_member, H, Dk, Dv]
        gathered = gather_seq(local, seq.group)[0]         # [n_chunks, H, Dk, Dv]
        b = [None] * n_chunks
        for pos, cid in enumerate(chunk_of):
            b[cid] = gathered[pos]
        size = total // n_chunks
        log_decay = core.log_decay().to(torch.float32)     # [H]
        if kwargs.get("heads") is not None:                # Ulysses: this rank's heads
            log_decay = log_decay[kwargs["heads"]]
        s_in = [torch.zeros_like(b[0])]
        for c in range(n_chunks - 1):
            inside = any(c * size <= p < (c + 1) * size for p in starts)  # reset in chunk c
            a = 0.0 if inside else torch.exp(log_decay * size)[:, None, None]
            s_in.append(a * s_in[-1] + b[c])
        # 3. outputs from the incoming states
        outs = []
        for s, e, sl, cu_loc in pieces:
            n_docs = cu_loc.numel() - 1
            init = torch.zeros((n_docs, *b[0].shape), dtype=torch.float32, device=q.device)
            if s not in starts:                            # the chunk continues a document
                init = torch.cat([s_in[s // size][None], init[1:]])
            o, _ = core.attend_with_state(q[:, sl], k[:, sl], v[:, sl], cu_loc, init, **kwargs)
            outs.append(o)
        out = torch.cat(outs, dim=1)
        # every rank must run the gather's backward (a collective), also one whose outputs use
        # no gathered state (member 0 of the contiguous layout): tie the gather into the graph
        return out + 0.0 * gathered.sum().to(out.dtype)

    return cp_attend

