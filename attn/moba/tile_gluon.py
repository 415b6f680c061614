"""MoBA's tile forward in Gluon for Hopper (sm_90): fwd.py's _tile_kernel (forward mode) as a
persistent warp-specialized kernel, under MOBA_TILE_IMPL (fwd.py).

fwd.py's Triton tile kernel runs one short program per 64-row tile (the own block gives a tile
~4 key chunks): its load latency is paid once per tile and never hidden. Here a program stays
resident and walks tiles in passes of G (G programs, one per SM; tile_at: forwards, then
backwards; tile t is rows 128·(t mod NQT) .. + 127 of batch·head t div NQT), and its producer
loads the next tile's inputs while the consumers attend the current one. Partitions:
  consumer 0 (default, 4 warps) : rows 0..63 of each tile
  consumer 1 (worker, 4 warps)  : rows 64..127
  producer   (worker, 1 warp)   : per tile, its Q halves by TMA into a ring of two tile slots,
      then the own block's K/V tiles [own block start, last row] by TMA into the K/V ring, then
      the nsel routed partials (routed.py's OP rows of the tile, one slot per stage: the rows of
      consumer 0 into the stage's K tile, those of consumer 1 into its V tile)
Each consumer runs the flash forward's steps (fwd_gluon.fwd_step) over the own-block tiles (the
tile at the consumer's first row masked causally; consumer 0 skips the last tile, which lies
past its rows, releasing its stage unread), then merges each partial through its lse (LP,
log2 domain) as fwd.py's _merge_partials does (slots with SEL = −1 add nothing; their OP rows
were never written, so they are selected away, not multiplied by 0), then writes O (through its
Q tile, by TMA) and lse; it frees the tile slot during the next tile's first step, by when the
store has landed.

Memory plan (D = 128, 16-bit): Q ring 2 tiles x 2 halves x [64, D] = 64 KB, K/V ring STAGES x
(K, V) [64, D] = 128 KB; registers per consumer thread as the flash forward's, plus a partial
tile [64, D] fp32 during the merge. HBM: Q, the own block's K/V (L2-shared by the tiles of a
block), the partials read once; O and lse written once.

Scope (tile_scope_error): fwd_gluon.scope_error's (Hopper, bf16 / fp16, D 64 / 128), no
documents, Tq, q_offset and block_size multiples of 128 (a tile lies in one own block), the
routed partials present (topk >= 2).
"""
from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                              warpgroup_mma, warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from attn.common import alloc
from attn.flash.common import _sm_count
from attn.flash.fwd_gluon import (CONSUMER_REGS, CONSUMER_WARPS, HALF_M, LN2, PRODUCER_REGS,
                                  _tile_layout, cta_sync, fwd_step, kv_load, kv_ring, mma_layout,
                                  online_softmax, scope_error, tile_desc, tma_load, tma_store)
from attn.moba.heads import token_stride
from attn.moba.routed_gluon import chunk_barriers

TILE_M = gl.constexpr(128)  # rows per tile: 64 per consumer
BLOCK_N = gl.constexpr(64)  # keys per K/V stage: with the two-tile Q ring, 4 stages fit in smem
STAGES = gl.constexpr(4)    # >= 3: a consumer holds tile j − 1 (its P·V in flight) while it waits


@gluon.jit
def tile_count(n_tiles):
    """How many tiles this program walks: tile_at(k) for k below it."""
    pid = gl.program_id(0)
    G = gl.num_programs(0)
    full = n_tiles // G                     # complete passes over the programs
    rem = n_tiles % G                       # tiles of the last, partial pass
    odd = full % 2                          # the partial pass runs backwards (tile_at)
    return full + (1 - odd) * (pid < rem).to(gl.int32) + odd * (pid >= G - rem).to(gl.int32)


@gluon.jit
def tile_at(k):
    """This program's k-th tile. Pass k covers tiles k·G .. k·G + G − 1 (G programs), given to
    the programs forwards on even passes and backwards on odd ones. A tile's cost grows with its
    place in its own block (tile_span: 1 to block_size / 128 key tiles) and G is often a multiple
    of block_size / 128 (132 SMs, 4 tiles per 512-key block), so in one direction every pass
    would give a program the same place; there and back pairs a heavy place with a light one,
    the programs finish together and walk neighbouring tiles (one block's K/V) at the same time,
    which L2 then serves once (docs/moba_notes.md)."""
    pid = gl.program_id(0)
    G = gl.num_programs(0)
    return k * G + pid + (k % 2) * (G - 1 - 2 * pid)


@gluon.jit
def tile_span(t, NQT, q_offset, block_size):
    """Tile t's (batch·head, first row q0, first own-block key tile f, key tiles end n): keys
    [f·BLOCK_N, n·BLOCK_N) = [own block start, last row + 1)."""
    bh = t // NQT
    q0 = (t % NQT) * TILE_M
    pos0 = q_offset + q0
    f = (pos0 // block_size) * block_size // BLOCK_N
    n = (pos0 + TILE_M) // BLOCK_N
    return bh, q0, f, n


@gluon.jit
def partial_load(p_desc, k_smem, v_smem, k_bar, v_bar, empty, r, row, col):
    """A tile's partials of one slot (OP rows row .. row + 127, columns col .. col + D) by TMA
    into ring slot r: rows 0..63 (consumer 0's) into the stage's K tile, 64..127 into its V
    tile, once both consumers have released the slot's previous use."""
    NS: gl.constexpr = k_smem.shape[0]     # the ring's stages (tile_dq_gluon.py's differ)
    st = r % NS
    mbarrier.wait(empty.index(st), ((r // NS) + 1) & 1, pred=r >= NS)
    mbarrier.expect(k_bar.index(st), p_desc.block_type.nbytes)
    tma_load(p_desc, [row, col], k_bar.index(st), k_smem.index(st))
    mbarrier.expect(v_bar.index(st), p_desc.block_type.nbytes)
    tma_load(p_desc, [row + HALF_M, col], v_bar.index(st), v_smem.index(st))


@gluon.jit
def tile_producer(q_desc, do_desc, k_desc, v_desc, p_desc, q_smem, do_smem, k_smem, v_smem,
                  q_ready, q_free, k_bar, v_bar, empty, Tq, Tk, hq, group, NQT, n_tiles, q_offset,
                  block_size, nsel, DQ: gl.constexpr):
    """The producer of both tile kernels: per tile, its Q halves (DQ, the tile dQ: and its dO
    halves) into the tile ring, the own block's K/V tiles, then the nsel partials (OP or DQP
    viewed as [B·Hq·Tq, nsel·D]: the tile's rows, slot s) into the K/V ring."""
    HEAD_DIM: gl.constexpr = q_desc.block_type.shape[1]
    r = 0                                   # K/V ring slots filled so far
    i = 0                                   # this program's tiles so far
    for k in range(tile_count(n_tiles)):
        bh, q0, f, n = tile_span(tile_at(k), NQT, q_offset, block_size)
        b = bh // hq
        h = bh % hq
        slot = i % 2
        # the slot's previous tile (i − 2) must have been written out by both consumers
        mbarrier.wait(q_free.index(slot), ((i // 2) + 1) & 1, pred=i >= 2)
        bar = q_ready.index(slot)
        mbarrier.expect(bar, (4 if DQ else 2) * q_desc.block_type.nbytes)
        for half in gl.static_range(2):
            row = b * Tq + q0 + half * HALF_M
            tma_load(q_desc, [row, h * HEAD_DIM], bar, q_smem.index(2 * slot + half))
            if DQ:
                tma_load(do_desc, [row, h * HEAD_DIM], bar, do_smem.index(2 * slot + half))
        row_k = b * Tk
        col = (h // group) * HEAD_DIM
        for j in range(f, n):
            kv_load(k_desc, v_desc, k_smem, v_smem, k_bar, v_bar, empty, r, row_k + j * BLOCK_N,
                    col)
            r += 1
        for s in range(nsel):
            partial_load(p_desc, k_smem, v_smem, k_bar, v_bar, empty, r, bh * Tq + q0,
                         s * HEAD_DIM)
            r += 1
        i += 1


@gluon.jit
def _producer(q_desc, k_desc, v_desc, p_desc, q_smem, k_smem, v_smem, q_ready, q_free, k_bar,
              v_bar, empty, Tq, Tk, hq, group, NQT, n_tiles, q_offset, block_size, nsel):
    # Q only: dO and its tiles are not read (DQ false)
    tile_producer(q_desc, q_desc, k_desc, v_desc, p_desc, q_smem, q_smem, k_smem, v_smem,
                  q_ready, q_free, k_bar, v_bar, empty, Tq, Tk, hq, group, NQT, n_tiles, q_offset,
                  block_size, nsel, False)


@gluon.jit
def skip_stage(k_bar, v_bar, empty, r):
    """Ring slot r released unread once its K and V tiles have landed (a consumer's key tile that
    lies past its rows)."""
    STAGES: gl.constexpr = k_bar.shape[0]
    mbarrier.wait(k_bar.index(r % STAGES), (r // STAGES) & 1)
    mbarrier.wait(v_bar.index(r % STAGES), (r // STAGES) & 1)
    mbarrier.arrive(empty.index(r % STAGES), count=1)


@gluon.jit
def ring_partial(k_smem, v_smem, k_bar, v_bar, empty, r, layout: gl.constexpr,
                 HALF: gl.constexpr):
    """This consumer's [64, D] partial tile from ring slot r (partial_load: the K tile for
    consumer 0, the V tile for consumer 1) in registers (layout), the slot then released."""
    STAGES: gl.constexpr = k_smem.shape[0]
    st = r % STAGES
    if HALF == 0:
        mbarrier.wait(k_bar.index(st), (r // STAGES) & 1)
        part = k_smem.index(st).load(layout)
    else:
        mbarrier.wait(v_bar.index(st), (r // STAGES) & 1)
        part = v_smem.index(st).load(layout)
    cta_sync()                              # every warp has read the stage
    mbarrier.arrive(empty.index(st), count=1)
    return part


@gluon.jit
def merge_partials(acc, m_i, l_i, ok, lp, SEL, LP, ent, k_smem, v_smem, k_bar, v_bar, empty, r,
                   HALF: gl.constexpr, nsel):
    """fwd.py's _merge_partials from the ring: slot s of this consumer's rows in ring slot r + s
    (the K tile for consumer 0, the V tile for consumer 1), released once read. ok, lp: slot 0's
    SEL >= 0 and LP (loaded by the caller ahead); each slot loads the next one's before it waits."""
    o_layout: gl.constexpr = acc.type.layout
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    for sl in range(nsel):
        st = (r + sl) % STAGES
        more = sl + 1 < nsel
        ok_next = gl.load(SEL + ent + sl + 1, mask=(ent >= 0) & more, other=-1) >= 0
        lp_next = gl.load(LP + ent + sl + 1, mask=(ent >= 0) & more, other=0.0)
        lp = gl.where(ok, lp, -1.0e30)
        m_new = gl.maximum(m_i, lp)
        alpha = gl.exp2(m_i - m_new)
        w = gl.where(ok, gl.exp2(lp - m_new), 0.0)
        if HALF == 0:
            mbarrier.wait(k_bar.index(st), ((r + sl) // STAGES) & 1)
            o_p = k_smem.index(st).load(o_layout)
        else:
            mbarrier.wait(v_bar.index(st), ((r + sl) // STAGES) & 1)
            o_p = v_smem.index(st).load(o_layout)
        cta_sync()                          # every warp has read the stage
        mbarrier.arrive(empty.index(st), count=1)
        # unused slots' rows were never written (any bits): selected away, not scaled by 0
        o_p = gl.where(gl.convert_layout(ok, row_o)[:, None], o_p.to(gl.float32), 0.0)
        acc = acc * gl.convert_layout(alpha, row_o)[:, None] \
            + gl.convert_layout(w, row_o)[:, None] * o_p
        l_i = l_i * alpha + w
        m_i = m_new
        ok = ok_next
        lp = lp_next
    return acc, m_i, l_i


@gluon.jit
def _consumer(o_desc, LSE, LP, SEL, q_smem, k_smem, v_smem, q_ready, q_free, k_bar, v_bar, empty,
              qk_scale, Tq, Tk, hq, NQT, n_tiles, q_offset, block_size, HALF: gl.constexpr,
              nsel):
    HEAD_DIM: gl.constexpr = q_smem.shape[2]
    s_layout: gl.constexpr = mma_layout(BLOCK_N)
    o_layout: gl.constexpr = mma_layout(HEAD_DIM)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    r = 0                                   # K/V ring slots consumed so far
    i = 0                                   # this program's tiles so far
    for k in range(tile_count(n_tiles)):
        bh, q0, f, n = tile_span(tile_at(k), NQT, q_offset, block_size)
        qh = q0 + HALF * HALF_M             # this consumer's first row
        rows = qh + gl.arange(0, HALF_M, layout=row_s)
        qpos = q_offset + rows
        lo = gl.full([HALF_M], 0, gl.int32, row_s) + f * BLOCK_N   # the own block's start
        ent = (bh.to(gl.int64) * Tq + rows) * nsel                 # entry (row, slot 0)
        # slot 0's choice and lse, loaded now: their latency hides under the own block
        ok0 = gl.load(SEL + ent) >= 0
        lp0 = gl.load(LP + ent)
        slot = i % 2
        q_half = q_smem.index(2 * slot + HALF)
        mbarrier.wait(q_ready.index(slot), (i // 2) & 1)
        # key tile f (ring slot r): S and its masked softmax, no P·V yet
        j0 = f - r                          # fwd_step's ring slot of key tile j is j − j0
        mbarrier.wait(k_bar.index(r % STAGES), (r // STAGES) & 1)
        s = warpgroup_mma(q_half, k_smem.index(r % STAGES).permute((1, 0)),
                          gl.zeros([HALF_M, BLOCK_N], gl.float32, s_layout), use_acc=False,
                          is_async=True)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
        m_i = gl.full([HALF_M], -1.0e30, gl.float32, row_s)     # finite: masked tiles give p = 0
        l_i = gl.zeros([HALF_M], gl.float32, row_s)
        p, alpha, m_i, l_i = online_softmax(s, m_i, l_i, qk_scale, f, qpos, lo, Tk, BLOCK_N,
                                            s_layout, True)
        p16 = gl.convert_layout(p.to(q_half.dtype), p_layout)
        acc = gl.zeros([HALF_M, HEAD_DIM], gl.float32, o_layout)
        # the previous tile's O store has had this tile's first step to land: free its Q slot
        # now rather than wait for the store at the end of that tile
        tma.store_wait(pendings=0)
        cta_sync()
        mbarrier.arrive(q_free.index(1 - slot), count=1, pred=i >= 1)
        # key tiles [f + 1, d) every row sees whole, [d, ne) masked (the diagonal); consumer 0
        # ends one tile early (ne = n − 1): tile n − 1 lies past its last row, so it only waits
        # for that stage and releases it
        d = gl.maximum((q_offset + qh) // BLOCK_N, f + 1)
        ne = n - 1 + HALF
        for j in range(f + 1, d):
            acc, p16, m_i, l_i = fwd_step(j, j0, ne, acc, p16, m_i, l_i, q_half, k_smem, v_smem,
                                          k_bar, v_bar, empty, qpos, lo, Tk, qk_scale, BLOCK_N,
                                          STAGES, s_layout, p_layout, o_layout, False)
        for j in range(d, ne):
            acc, p16, m_i, l_i = fwd_step(j, j0, ne, acc, p16, m_i, l_i, q_half, k_smem, v_smem,
                                          k_bar, v_bar, empty, qpos, lo, Tk, qk_scale, BLOCK_N,
                                          STAGES, s_layout, p_layout, o_layout, True)
        last = r + ne - 1 - f               # the last attended key tile's ring slot: its P·V
        mbarrier.wait(v_bar.index(last % STAGES), (last // STAGES) & 1)
        acc = warpgroup_mma(p16, v_smem.index(last % STAGES), acc, is_async=True)
        acc, p16 = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p16))
        cta_sync()
        mbarrier.arrive(empty.index(last % STAGES), count=1)   # the producer refills it
        if HALF == 0:                       # the skipped tile's stage: landed, then released
            sk = last + 1
            mbarrier.wait(k_bar.index(sk % STAGES), (sk // STAGES) & 1)
            mbarrier.wait(v_bar.index(sk % STAGES), (sk // STAGES) & 1)
            mbarrier.arrive(empty.index(sk % STAGES), count=1)
        r += n - f
        acc, m_i, l_i = merge_partials(acc, m_i, l_i, ok0, lp0, SEL, LP, ent, k_smem, v_smem,
                                       k_bar, v_bar, empty, r, HALF, nsel)
        r += nsel

        # every row sees its own key: l > 0
        acc = acc / gl.convert_layout(l_i, row_o)[:, None]
        q_half.store(acc.to(q_half.dtype))  # Q is no longer read: its tile stages O
        fence_async_shared()
        tma_store(o_desc, [(bh // hq) * Tq + qh, (bh % hq) * HEAD_DIM], q_half)
        gl.store(LSE + bh.to(gl.int64) * Tq + rows, (m_i + gl.log2(l_i)) * LN2)
        i += 1
    tma.store_wait(pendings=0)              # the last tile's O has left shared memory


# partition entry points take runtime values only (fwd_gluon.py), one per consumer half
@gluon.jit
def _rows_0_63(o_desc, LSE, LP, SEL, q_smem, k_smem, v_smem, q_ready, q_free, k_bar, v_bar, empty,
               qk_scale, Tq, Tk, hq, NQT, n_tiles, q_offset, block_size, nsel):
    _consumer(o_desc, LSE, LP, SEL, q_smem, k_smem, v_smem, q_ready, q_free, k_bar, v_bar, empty,
              qk_scale, Tq, Tk, hq, NQT, n_tiles, q_offset, block_size, 0, nsel)


@gluon.jit
def _rows_64_127(o_desc, LSE, LP, SEL, q_smem, k_smem, v_smem, q_ready, q_free, k_bar, v_bar,
                 empty, qk_scale, Tq, Tk, hq, NQT, n_tiles, q_offset, block_size,
                 nsel):
    _consumer(o_desc, LSE, LP, SEL, q_smem, k_smem, v_smem, q_ready, q_free, k_bar, v_bar, empty,
              qk_scale, Tq, Tk, hq, NQT, n_tiles, q_offset, block_size, 1, nsel)


@gluon.jit
def _tile_fwd_kernel(q_desc, k_desc, v_desc, p_desc, o_desc, LSE, LP, SEL, qk_scale, Tq, Tk, hq,
                     group, NQT, n_tiles, q_offset, block_size, nsel, HEAD_DIM: gl.constexpr,
                     CONSUMER_REGS: gl.constexpr,
                     PRODUCER_REGS: gl.constexpr, num_warps: gl.constexpr):
    """Persistent: program pid takes tiles tile_at(0), tile_at(1), ... of n_tiles = B·Hq·NQT."""
    gl.static_assert(num_warps == CONSUMER_WARPS)
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [4, HALF_M, HEAD_DIM], q_desc.layout)
    q_ready, q_free = chunk_barriers()
    k_smem, v_smem, k_bar, v_bar, empty = kv_ring(k_desc, v_desc, STAGES)
    fence_async_shared()

    consumer_args = (o_desc, LSE, LP, SEL, q_smem, k_smem, v_smem, q_ready, q_free, k_bar, v_bar,
                     empty, qk_scale, Tq, Tk, hq, NQT, n_tiles, q_offset, block_size, nsel)
    gl.warp_specialize([
        (_rows_0_63, consumer_args),
        (_rows_64_127, consumer_args),
        (_producer, (q_desc, k_desc, v_desc, p_desc, q_smem, k_smem, v_smem, q_ready, q_free,
                     k_bar, v_bar, empty, Tq, Tk, hq, group, NQT, n_tiles, q_offset, block_size,
                     nsel)),
    ], [CONSUMER_WARPS, 1], [CONSUMER_REGS, PRODUCER_REGS])


# launch

def tile_scope_error(q, k, block_size, q_offset: int, has_docs: bool) -> str | None:
    """Why the Gluon tile forward cannot run these inputs, or None."""
    why = scope_error(q, k)
    if why is not None:
        return why.replace("Gluon flash forward", "MoBA Gluon tile forward")
    if has_docs:
        return "the MoBA Gluon tile forward takes no documents (cu_seqlens)"
    m = TILE_M.value
    if not block_size or block_size % m or q.shape[1] % m or q_offset % m:
        return f"the MoBA Gluon tile forward needs block_size, Tq and q_offset multiples of " \
               f"{m}; got block_size={block_size}, Tq={q.shape[1]}, q_offset={q_offset}"
    return None


def partial_desc(parts, tq: int, d: int):
    """TMA descriptor of routed partials [B·Hq, Tq·NSEL, D] (OP or DQP) viewed as
    [B·Hq·Tq, NSEL·D], tiles of [64, D] (one slot of one consumer's rows) in the K tiles' layout."""
    p2 = parts.view(parts.shape[0] * tq, -1)
    return TensorDescriptor(p2, list(p2.shape), list(p2.stride()), [HALF_M.value, d],
                            _tile_layout(HALF_M.value, d, parts.dtype == torch.bfloat16))


def tile_fwd_gluon(q, k, v, sel, op, lp, scale_log2: float, q_offset: int, block_size: int,
                   programs=None, out=None):
    """(o, lse) of fwd.fwd_triton's contract given the routed partials (op, lp) and sel, through
    the persistent Gluon kernel; ValueError outside its scope (documents are the caller's to
    rule out). programs: tuning override of the grid (default: one per SM); out: (o, lse) to
    write (a head piece's views, heads.py), else new ones."""
    why = tile_scope_error(q, k, block_size, q_offset, False)
    if why is not None:
        raise ValueError(why)
    B, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    nsel = sel.shape[-1]
    if out is None:
        out = alloc.empty(q.shape, q.dtype, q.device), \
            alloc.empty((B, hq, tq), torch.float32, q.device)
    o, lse = out
    token_stride(q, o)
    token_stride(k, v)
    p_desc = partial_desc(op, tq, d)
    nqt = tq // TILE_M.value
    n_tiles = B * hq * nqt
    grid = min(programs or _sm_count(q.device.index or 0), n_tiles)
    _tile_fwd_kernel[(grid,)](
        tile_desc(q, HALF_M.value), tile_desc(k, BLOCK_N.value), tile_desc(v, BLOCK_N.value),
        p_desc, tile_desc(o, HALF_M.value), lse, lp, sel, scale_log2, tq, tk, hq, hq // hkv,
        nqt, n_tiles, q_offset, block_size, nsel, HEAD_DIM=d, CONSUMER_REGS=CONSUMER_REGS,
        PRODUCER_REGS=PRODUCER_REGS, num_warps=CONSUMER_WARPS)
    return o, lse
