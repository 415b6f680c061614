"""`lasp` context parallelism for the linear families (linear, lightning), LASP-2 style.

A chunk of the sequence maps an incoming state S to  S_out = A·S + B  with A = exp(−slope·n)
per head (n tokens; 1 for plain linear attention; 0 when a document starts inside the chunk,
since the state resets) and B its own final state from a zero start. So:
1. each rank runs its chunks once from a zero state: outputs o⁰ and final states B;
2. one all-gather of the B's (H·Dk·Dv fp32 per chunk); every rank forms the prefix
   S_in[c] = A_{c−1}·S_in[c−1] + B_{c−1} over chunks in sequence order;
3. the state is linear in its start, S_t = λ^(t+1)·S_in + B_t, so each output up to the chunk's
   first document boundary gains scale·λ^(t+1)·q_t·S_in: one dense [n, Dk] × [Dk, Dv] product
   per head instead of a second pass over the chunk.
The all-gather's backward reduce-scatters the state gradients: the suffix combination of the
backward pass comes from autograd. Zigzag works unchanged (chunks are combined in sequence
order, wherever they live), and so does any placement (parallel/sharding.py): under a Ulysses
degree u the group is the outer group of cp/u members, each holding 2u (zigzag) or u chunks
for H/u heads (`heads=` selects the decays). Bytes per layer and rank: n_chunks·H·Dk·Dv·4
(H/u heads under Ulysses), independent of T.

Cores provide `attend_with_state(q, k, v, cu_seqlens, initial_state, heads=None) -> (o, S)`
(S: fp32 [N_docs, H, Dk, Dv]; the gradient of S flows back into k and v), `scale` (o = scale·q·S)
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
        # 1. every local chunk from a zero state: outputs o⁰ and own final state B, one pass
        outs, finals = [], []
        for s, e, sl, cu_loc in pieces:
            o, state = core.attend_with_state(q[:, sl], k[:, sl], v[:, sl], cu_loc, None, **kwargs)
            outs.append(o)
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
        # 3. the incoming state's share of the outputs, up to the chunk's first document
        #    boundary: S_t = λ^(t+1)·S_in + B_t, so o_t += scale·λ^(t+1)·q_t·S_in
        for i, (s, e, sl, cu_loc) in enumerate(pieces):
            if s in starts:                                # a document starts here: nothing
                continue
            n = int(cu_loc[1])
            t = torch.arange(1, n + 1, device=q.device, dtype=torch.float32)
            decay = torch.exp(t[:, None] * log_decay[None, :])[None, :, :, None]   # [1, n, H, 1]
            extra = torch.einsum("bthk,hkv->bthv", q[:, sl][:, :n].float(), s_in[s // size])
            head = outs[i][:, :n] + (core.scale * decay * extra).to(outs[i].dtype)
            outs[i] = torch.cat([head, outs[i][:, n:]], dim=1)
        out = torch.cat(outs, dim=1)
        # every rank must run the gather's backward (a collective), also one whose outputs use
        # no gathered state (member 0 of the contiguous layout): tie the gather into the graph
        return out + 0.0 * gathered.sum().to(out.dtype)

    return cp_attend

