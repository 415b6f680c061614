"""Reference (plain PyTorch) of the linear-attention families: the definition and the CPU path.

    recurrent(q, k, v, slopes=None, *, scale, initial_state, cu_seqlens) -> (o, final_state)
        The definition, token by token: S_t = lam_h S_{t-1} + k_t^T v_t, o_t = scale q_t S_t,
        lam_h = exp(-slopes[h]) (1 without slopes), S_{-1} = initial_state or 0, per document.
        Computes in float64 when given float64 (the test oracle), else in float32.
    chunked(...) -> (o, final_state)
        The same function in chunks of CHUNK tokens (what the kernels do, in torch ops): the CPU
        path of `linear_attn` / `lightning_attn`, differentiable by autograd. Matmul operands
        are in the input dtype (as on the GPU's tensor cores), states and decays in fp32
        (float64 for float64 inputs).
    masked(...) -> (o, final_state)
        The same function in the quadratic form, documents as a mask and no host values, so
        torch.compile traces it whole: the CPU path under compile (the others loop over
        documents on the host). Computes in float32 (float64 for float64); O(T^2) per head.

Layout q, k, v [B, T, H, D] (one head count), states [B or N, H, Dk, Dv]; with cu_seqlens
(int32 [N+1], B == 1) every document restarts from initial_state[n] (or 0).
"""
from __future__ import annotations

import torch

CHUNK = 64  # tokens per chunk of the chunked form (the kernels' intra-chunk tile)


def _state_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _docs(q, cu_seqlens):
    """[(batch row, first, end, state index)] of the independent sequences."""
    B, T = q.shape[:2]
    if cu_seqlens is None:
        return [(b, 0, T, b) for b in range(B)]
    cu = cu_seqlens.tolist()
    return [(0, cu[n], cu[n + 1], n) for n in range(len(cu) - 1)]


def _per_document(fn, q, k, v, slopes, scale, initial_state, cu_seqlens):
    B, T, H, D = q.shape
    sd = _state_dtype(q.dtype)
    scale = D ** -0.5 if scale is None else scale
    # log of the per-head decay, -slopes (<= 0)
    loglam = None if slopes is None else -slopes.detach().to(device=q.device, dtype=sd)
    outs, finals = [], []
    for b, s, e, n in _docs(q, cu_seqlens):
        init = None if initial_state is None else initial_state[n].to(sd)
        o, st = fn(q[b, s:e], k[b, s:e], v[b, s:e], loglam, scale, init)
        outs.append(o)
        finals.append(st)
    if outs[0] is None:  # final state only
        return None, torch.stack(finals)
    if cu_seqlens is None:
        o = torch.stack(outs)
    else:
        o = torch.cat(outs).unsqueeze(0)
    return o, torch.stack(finals)


def _recurrent_one(q, k, v, loglam, scale, init):
    """One sequence [T, H, D]."""
    lam = None if loglam is None else torch.exp(loglam)
    T, H, D = q.shape
    sd = _state_dtype(q.dtype)
    q, k, v = q.to(sd), k.to(sd), v.to(sd)
    S = torch.zeros(H, D, v.shape[-1], dtype=sd, device=q.device) if init is None else init
    outs = []
    for t in range(T):
        if lam is not None:
            S = lam[:, None, None] * S
        S = S + k[t, :, :, None] * v[t, :, None, :]
        outs.append(scale * torch.einsum("hd,hde->he", q[t], S))
    o = torch.stack(outs) if outs else q.new_zeros(0, H, v.shape[-1])
    return o, S


def _chunked_one(q, k, v, loglam, scale, init, chunk=CHUNK):
    """One sequence [T, H, D], chunkwise: intra-chunk left product, inter-chunk right product."""
    T, H, D = q.shape
    Dv = v.shape[-1]
    cd, sd = q.dtype, _state_dtype(q.dtype)
    dev = q.device
    S = torch.zeros(H, D, Dv, dtype=sd, device=dev) if init is None else init
    if T == 0:
        return q.new_zeros(0, H, Dv), S
    nc = -(-T // chunk)
    pad = nc * chunk - T
    # [H, NC, C, D]
    qc, kc, vc = (torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad)).view(nc, chunk, H, -1)
                  .permute(2, 0, 1, 3) for x in (q, k, v))
    lens = torch.full((nc,), chunk, device=dev)
    lens[-1] = T - (nc - 1) * chunk
    i = torch.arange(chunk, device=dev)
    causal = i[:, None] >= i[None, :]
    if loglam is None:
        loglam = torch.zeros(H, dtype=sd, device=dev)
    dist = (i[:, None] - i[None, :]).clamp(min=0).to(sd)
    mask = torch.where(causal, torch.exp(loglam[:, None, None] * dist), 0.0)  # [H, C, C]
    scores = (qc @ kc.transpose(-1, -2)).to(sd) * mask[:, None]
    o_intra = (scores.to(cd) @ vc).to(sd)
    # decays of the right product (row t of a chunk sees the entering state through lam^(t+1))
    # and of the state update (token u reaches the chunk's end state through lam^(L-1-u))
    e_out = torch.exp(loglam[:, None] * (i + 1).to(sd))  # [H, C]
    e_upd_exp = (lens[:, None] - 1 - i[None, :]).to(sd)  # [NC, C]
    valid = e_upd_exp >= 0
    e_upd = torch.where(valid, torch.exp(loglam[:, None, None] * e_upd_exp.clamp(min=0)), 0.0)
    deltas = kc.transpose(-1, -2) @ (vc.to(sd) * e_upd[..., None]).to(cd)  # [H, NC, D, Dv]
    chunk_decay = torch.exp(loglam[:, None] * lens.to(sd))  # [H, NC]
    starts = []
    for c in range(nc):
        starts.append(S)
        S = chunk_decay[:, c, None, None] * S + deltas[:, c].to(sd)
    St = torch.stack(starts, dim=1)  # [H, NC, D, Dv]
    o_inter = (qc @ St.to(cd)).to(sd) * e_out[:, None, :, None]
    o = scale * (o_intra + o_inter)
    o = o.permute(1, 2, 0, 3).reshape(nc * chunk, H, Dv)[:T]
    return o.to(cd), S


def recurrent(q, k, v, slopes=None, *, scale=None, initial_state=None, cu_seqlens=None):
    """The definition (token-by-token recurrence); see the module docstring."""
    o, st = _per_document(_recurrent_one, q, k, v, slopes, scale, initial_state, cu_seqlens)
    return o.to(q.dtype), st


def chunked(q, k, v, slopes=None, *, scale=None, initial_state=None, cu_seqlens=None):
    """The chunked form (CPU path); equal to `recurrent` up to rounding."""
    return _per_document(_chunked_one, q, k, v, slopes, scale, initial_state, cu_seqlens)


def masked(q, k, v, slopes=None, *, scale=None, initial_state=None, cu_seqlens=None):
    """o_t = scale * (sum_{s <= t, same document} lam^(t-s) (q_t . k_s) v_s
    + lam^(t-start+1) q_t S_init); final = lam^len S_init + sum_t lam^(end-1-t) k_t^T v_t."""
    B, T, H, D = q.shape
    sd = _state_dtype(q.dtype)
    dev = q.device
    scale = D ** -0.5 if scale is None else scale
    loglam = (torch.zeros(H, dtype=sd, device=dev) if slopes is None
              else -slopes.detach().to(device=dev, dtype=sd))
    pos = torch.arange(T, device=dev)
    if cu_seqlens is None:
        doc, start, end = torch.zeros_like(pos), torch.zeros_like(pos), torch.full_like(pos, T)
    else:
        cu = cu_seqlens.to(device=dev, dtype=torch.long)
        # the document of token t: the number of document ends at or before t (empty ones too)
        doc = torch.searchsorted(cu[1:], pos, right=True)
        start, end = cu[doc], cu[doc + 1]
    visible = (doc[:, None] == doc[None, :]) & (pos[:, None] >= pos[None, :])     # [T, T]
    dist = (pos[:, None] - pos[None, :]).clamp(min=0).to(sd)
    decay = torch.where(visible, torch.exp(loglam[:, None, None] * dist), 0.0)     # [H, T, T]
    qf, kf, vf = q.to(sd), k.to(sd), v.to(sd)
    scores = torch.einsum("bthd,bshd->bhts", qf, kf) * decay
    o = torch.einsum("bhts,bshe->bthe", scores, vf)
    w_end = torch.exp(loglam[None, :] * (end - 1 - pos).to(sd)[:, None])            # [T, H]
    if cu_seqlens is None:
        final = torch.einsum("bthd,bthe,th->bhde", kf, vf, w_end)
        lens = torch.full((B,), T, device=dev)
        init_of_token = None if initial_state is None else initial_state.to(sd)[:, None]
    else:
        n_docs = cu.shape[0] - 1
        member = (doc[:, None] == torch.arange(n_docs, device=dev)[None, :]).to(sd)  # [T, N]
        final = torch.einsum("tn,thd,the,th->nhde", member, kf[0], vf[0], w_end)
        lens = cu[1:] - cu[:-1]
        init_of_token = None if initial_state is None else initial_state.to(sd)[doc][None]
    if initial_state is not None:
        w_start = torch.exp(loglam[None, :] * (pos - start + 1).to(sd)[:, None])      # [T, H]
        o = o + torch.einsum("bthd,bthde->bthe", qf, init_of_token) * w_start[..., None]
        final = final + (torch.exp(loglam[None, :] * lens.to(sd)[:, None])[..., None, None]
                         * initial_state.to(sd))
    return (scale * o).to(q.dtype), final
