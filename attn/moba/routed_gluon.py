"""MoBA's routed forward in Gluon for Hopper (sm_90): routed.py's _routed_fwd_kernel as the flash
forward's warp-specialized partitions (attn/flash/fwd_gluon.py) with a producer that gathers the
routed query rows by cp.async (dkdv_gluon.py's, Hopper's TMA loads boxes, it cannot gather rows),
under MOBA_ROUTED_IMPL (routed.py).

SPLIT programs per (batch·query head, block), program z taking the chunks z, z + SPLIT, ... of
128 entries: the inverse index (routed.py) lists per (bh, block j) the entries e = row·NSEL +
slot that chose j (ENTRIES[ROWPTR[bh·NB + j] ..], ROWS their rows); programs without a chunk
exit. Partitions:
  consumer 0 (default, 4 warps) : entries 0..63 of each chunk
  consumer 1 (worker, 4 warps)  : entries 64..127
  producer   (worker, PRODUCER_WARPS warps) : per chunk, the 128 Q rows by cp.async into a ring
      of two chunk slots (row ids loaded a chunk ahead), then the block's K/V tiles by TMA into
      the K/V ring (slots counted across chunks)
so the next chunk's rows are gathered while the consumers attend the current one. Each consumer
runs the flash forward's steps (fwd_gluon.fwd_step: the softmax of key tile t overlapping the P·V
product of tile t − 1) over the block's tiles without masks (the block lies wholly before its
routed rows and is complete), then writes the chunk's outputs per entry, as routed.py's: the
normalised partial output OP [B·Hq, Tq·NSEL, D] (through its Q tile, then row stores) and its
log2-domain lse LP [B·Hq, Tq·NSEL]; then it frees the chunk slot. Padding entries of a chunk's
tail copy nothing (zeros in the slot, never stored).

Memory plan (D = 128, 16-bit): Q ring 2 chunks x 2 halves x [64, D] = 64 KB, K/V ring STAGES x
(K, V) [BLOCK_N, D] = 128 KB; registers per consumer thread as the flash forward's.

Scope (routed_scope_error): fwd_gluon.scope_error's (Hopper, bf16 / fp16, D 64 / 128), no
documents, block_size a multiple of BLOCK_N.
"""
from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier,
                                                              warpgroup_mma, warpgroup_mma_wait)

from attn.flash.fwd_gluon import (CONSUMER_REGS, CONSUMER_WARPS, HALF_M, PRODUCER_REGS, cta_sync,
                                  fwd_step, kv_load, kv_ring, mma_layout, online_softmax,
                                  scope_error, tile_desc)
from attn.moba.dkdv_gluon import SUB_M, cp_async, row_copy_layout
from attn.moba.heads import gather_heads, token_stride

TILE = gl.constexpr(128)    # entries per chunk: 64 per consumer
BLOCK_N = gl.constexpr(64)  # keys per K/V ring stage (128-key stages leave no room for the Q ring)
STAGES = gl.constexpr(4)    # >= 3: a consumer holds tile t − 1 (its P·V in flight) while it waits
# programs per (block, head), program z taking chunks z, z + SPLIT, ... (routed.py's GPU_SPLIT:
# early blocks have the longest row lists); the gather of one chunk hides under the previous
# one's tiles
SPLIT = 4
PRODUCER_WARPS = 4          # gathering warps (dkdv_gluon.py: one warp cannot keep up)


@gluon.jit
def gather_chunk(Q_h, DO_h, LSE_h, DELTA_h, ids, ids_smem, cnt, q_smem, do_smem, lse_smem,
                 delta_smem, slot, bar, stride_t, DQ: gl.constexpr):
    """The chunk's 128 rows (ids, valid below cnt) into ring slot `slot`: their Q rows into the
    slot's two [64, D] halves by cp.async, SUB_M rows per producer warp at a time; DQ (the routed
    dQ) their dO rows likewise and their lse, delta per row. Padding rows copy nothing (zero
    fill). Each thread arms a cp.async arrive on bar, one elected arrive makes its count."""
    HEAD_DIM: gl.constexpr = q_smem.shape[2]
    PW: gl.constexpr = gl.num_warps()
    STEP: gl.constexpr = SUB_M * PW
    tile: gl.constexpr = row_copy_layout(HEAD_DIM, PW)
    sub = gl.arange(0, STEP, layout=gl.SliceLayout(1, tile))
    cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, tile))
    cta_sync()                         # the previous chunk's ids are read
    ids_smem.store(ids)
    cta_sync()
    for r0 in gl.static_range(0, TILE, STEP):
        rows = ids_smem.slice(r0, STEP).load(gl.SliceLayout(1, tile))
        offs = rows.to(gl.int64)[:, None] * stride_t + cols[None, :]
        ok = (r0 + sub < cnt)[:, None]
        half = 2 * slot + r0 // HALF_M
        cp_async(q_smem.index(half).slice(r0 % HALF_M, STEP), Q_h + offs, mask=ok)
        if DQ:
            cp_async(do_smem.index(half).slice(r0 % HALF_M, STEP), DO_h + offs, mask=ok)
    if DQ:
        SPT: gl.constexpr = TILE // (32 * PW) if TILE >= 32 * PW else 1
        idx = gl.arange(0, TILE, layout=gl.BlockedLayout([SPT], [32], [PW], [0]))  # ids' layout
        cp_async(lse_smem.index(slot), LSE_h + ids, mask=idx < cnt)
        cp_async(delta_smem.index(slot), DELTA_h + ids, mask=idx < cnt)
    async_copy.mbarrier_arrive(bar)    # armed per thread: lands with its copies
    if PW > 1:
        cta_sync()                     # every warp has armed its arrive
    mbarrier.arrive(bar, count=1)      # the barrier's count of 1 (elected thread)


@gluon.jit
def chunk_producer(Q, DO, LSE, DELTA, ROWS, ROWPTR, k_desc, v_desc, q_smem, do_smem, lse_smem,
                   delta_smem, k_smem, v_smem, q_ready, q_free, k_bar, v_bar, empty, Tq, Tk, hq,
                   group, NB, block_size, grp, c0, cstep, nch, DQ: gl.constexpr):
    """The producer of both routed kernels: per chunk c0 + c·cstep of group grp, its rows into
    the chunk ring (gather_chunk; row ids loaded a chunk ahead), then the block's K/V tiles into
    the K/V ring (slots counted across chunks). hq: Q's head count in memory (its token stride
    / D; for a head piece the full tensor's, heads.gather_heads)."""
    HEAD_DIM: gl.constexpr = k_desc.block_type.shape[1]
    PW: gl.constexpr = gl.num_warps()
    SPT: gl.constexpr = TILE // (32 * PW) if TILE >= 32 * PW else 1
    line: gl.constexpr = gl.BlockedLayout([SPT], [32], [PW], [0])
    ids_smem = gl.allocate_shared_memory(gl.int32, [TILE], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    bh = grp // NB
    b = bh // hq
    h = bh % hq
    stride_t = hq * HEAD_DIM
    base = b.to(gl.int64) * Tq * stride_t + h * HEAD_DIM
    row_base = bh.to(gl.int64) * Tq                 # lse, delta [B·Hq, Tq]
    row_k = b * Tk + (grp % NB) * block_size        # the block's first key row
    col = (h // group) * HEAD_DIM
    n_tiles = block_size // BLOCK_N
    beg = gl.load(ROWPTR + grp)
    end = gl.load(ROWPTR + grp + 1)
    idx = gl.arange(0, TILE, layout=line)
    first = beg + c0 * TILE                         # this program's chunk c starts at
    ids_next = gl.load(ROWS + first + idx, mask=first + idx < end, other=0)  # first + c·step
    step = cstep * TILE
    for c in range(nch):
        ids = ids_next
        nxt = first + (c + 1) * step + idx
        ids_next = gl.load(ROWS + nxt, mask=nxt < end, other=0)
        slot = c % 2
        # the slot's previous chunk (c − 2) must have been written out by both consumers
        mbarrier.wait(q_free.index(slot), ((c // 2) + 1) & 1, pred=c >= 2)
        gather_chunk(Q + base, DO + base, LSE + row_base, DELTA + row_base, ids, ids_smem,
                     end - first - c * step, q_smem, do_smem, lse_smem, delta_smem, slot,
                     q_ready.index(slot), stride_t, DQ)
        for t in range(n_tiles):               # ring slots counted across chunks
            kv_load(k_desc, v_desc, k_smem, v_smem, k_bar, v_bar, empty, c * n_tiles + t,
                    row_k + t * BLOCK_N, col)


@gluon.jit
def _producer(Q, ROWS, ROWPTR, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, q_free, k_bar,
              v_bar, empty, Tq, Tk, hq, group, NB, block_size, grp, c0, cstep, nch):
    # Q rows only: dO, lse, delta and their tiles are not read (DQ false)
    chunk_producer(Q, Q, Q, Q, ROWS, ROWPTR, k_desc, v_desc, q_smem, q_smem, q_smem, q_smem,
                   k_smem, v_smem, q_ready, q_free, k_bar, v_bar, empty, Tq, Tk, hq, group, NB,
                   block_size, grp, c0, cstep, nch, False)


@gluon.jit
def consumer_entries(ROWPTR, grp, NB, c0, HALF: gl.constexpr):
    """(bh, end, first) of a consumer of group grp (= bh·NB + block): its batch·head (int64),
    the end of the group's entries and this consumer's first entry (its half of chunk c0)."""
    bh = (grp // NB).to(gl.int64)
    end = gl.load(ROWPTR + grp + 1)
    first = gl.load(ROWPTR + grp) + c0 * TILE + HALF * HALF_M
    return bh, end, first


@gluon.jit
def store_entries(OUT, ENTRIES, tile, val, first, end, bh, Tq, nsel, rows_l: gl.constexpr):
    """val [64, D] (a consumer's chunk result) written to OUT's rows of the entries
    ENTRIES[first + i] below end, staged through tile (a shared [64, D] tile no longer read);
    returns the entries' flat row indices e and their mask, for per-row outputs."""
    HEAD_DIM: gl.constexpr = tile.shape[1]
    tile.store(val.to(tile.dtype))
    cta_sync()
    i = gl.arange(0, HALF_M, layout=gl.SliceLayout(1, rows_l))
    cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, rows_l))
    ok = first + i < end
    e = gl.load(ENTRIES + first + i, mask=ok, other=0).to(gl.int64) + bh * Tq * nsel
    gl.store(OUT + e[:, None] * HEAD_DIM + cols[None, :], tile.load(rows_l), mask=ok[:, None])
    return e, ok


@gluon.jit
def _consumer(OP, LP, ENTRIES, ROWPTR, q_smem, k_smem, v_smem, q_ready, q_free, k_bar, v_bar,
              empty, qk_scale, Tq, NB, nsel, block_size, grp, c0, cstep, nch,
              HALF: gl.constexpr):
    HEAD_DIM: gl.constexpr = q_smem.shape[2]
    s_layout: gl.constexpr = mma_layout(BLOCK_N)
    o_layout: gl.constexpr = mma_layout(HEAD_DIM)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    rows_l: gl.constexpr = row_copy_layout(HEAD_DIM, CONSUMER_WARPS)
    n_tiles = block_size // BLOCK_N
    bh, end, first = consumer_entries(ROWPTR, grp, NB, c0, HALF)
    for c in range(nch):
        slot = c % 2
        q_half = q_smem.index(2 * slot + HALF)
        rb = c * n_tiles                       # ring slots before this chunk
        mbarrier.wait(q_ready.index(slot), (c // 2) & 1)
        fence_async_shared()   # the slot was written by cp.async (generic proxy), wgmma reads it
        # tile 0 (ring slot rb): S and its softmax, no P·V yet (the scalar 0s stand for the mask
        # arguments an unmasked softmax does not read)
        mbarrier.wait(k_bar.index(rb % STAGES), (rb // STAGES) & 1)
        s = warpgroup_mma(q_half, k_smem.index(rb % STAGES).permute((1, 0)),
                          gl.zeros([HALF_M, BLOCK_N], gl.float32, s_layout), use_acc=False,
                          is_async=True)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
        m_i = gl.full([HALF_M], -1.0e30, gl.float32, gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([HALF_M], gl.float32, gl.SliceLayout(1, s_layout))
        p, alpha, m_i, l_i = online_softmax(s, m_i, l_i, qk_scale, 0, 0, 0, 0, BLOCK_N,
                                            s_layout, False)
        p16 = gl.convert_layout(p.to(q_half.dtype), p_layout)
        acc = gl.zeros([HALF_M, HEAD_DIM], gl.float32, o_layout)
        for t in range(1, n_tiles):            # fwd_step's ring slot t − (−rb)
            acc, p16, m_i, l_i = fwd_step(t, -rb, n_tiles, acc, p16, m_i, l_i, q_half, k_smem,
                                          v_smem, k_bar, v_bar, empty, 0, 0, 0, qk_scale,
                                          BLOCK_N, STAGES, s_layout, p_layout, o_layout, False)
        last = rb + n_tiles - 1
        mbarrier.wait(v_bar.index(last % STAGES), (last // STAGES) & 1)
        acc = warpgroup_mma(p16, v_smem.index(last % STAGES), acc, is_async=True)
        acc, p16 = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p16))
        cta_sync()
        mbarrier.arrive(empty.index(last % STAGES), count=1)   # the producer refills it

        # O (normalised; every row sees the whole block, so l > 0) through q_half (Q is no
        # longer read: the products were waited for)
        acc = acc / gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))[:, None]
        e, ok = store_entries(OP, ENTRIES, q_half, acc, first + c * cstep * TILE, end, bh, Tq,
                              nsel, rows_l)
        gl.store(LP + e, gl.convert_layout(m_i + gl.log2(l_i), gl.SliceLayout(1, rows_l)),
                 mask=ok)
        cta_sync()                             # every warp has read the slot
        mbarrier.arrive(q_free.index(slot), count=1)


# partition entry points take runtime values only (fwd_gluon.py), one per consumer half
@gluon.jit
def _entries_0_63(OP, LP, ENTRIES, ROWPTR, q_smem, k_smem, v_smem, q_ready, q_free, k_bar, v_bar,
                  empty, qk_scale, Tq, NB, nsel, block_size, grp, c0, cstep, nch):
    _consumer(OP, LP, ENTRIES, ROWPTR, q_smem, k_smem, v_smem, q_ready, q_free, k_bar, v_bar,
              empty, qk_scale, Tq, NB, nsel, block_size, grp, c0, cstep, nch, 0)


@gluon.jit
def _entries_64_127(OP, LP, ENTRIES, ROWPTR, q_smem, k_smem, v_smem, q_ready, q_free, k_bar,
                    v_bar, empty, qk_scale, Tq, NB, nsel, block_size, grp, c0, cstep, nch):
    _consumer(OP, LP, ENTRIES, ROWPTR, q_smem, k_smem, v_smem, q_ready, q_free, k_bar, v_bar,
              empty, qk_scale, Tq, NB, nsel, block_size, grp, c0, cstep, nch, 1)


@gluon.jit
def routed_work(ROWPTR, NB, split):
    """This program's (group bh·NB + block, first chunk c0, chunk count): the chunks c0,
    c0 + split, ... of the group's entries. The split programs of one (block, head) are
    neighbours on axis 0 (routed.py's order): they share the block's K, V in L2."""
    c0 = gl.program_id(0) % split
    grp = gl.program_id(1) * NB + gl.program_id(0) // split
    chunks = gl.cdiv(gl.load(ROWPTR + grp + 1) - gl.load(ROWPTR + grp), TILE)
    return grp, c0, gl.cdiv(gl.maximum(chunks - c0, 0), split)


@gluon.jit
def chunk_barriers():
    """The chunk ring's barriers, initialised: q_ready (the producer's copies landed), q_free
    (one arrival per consumer once it has written the chunk out), two slots."""
    q_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    q_free = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(q_free.index(i), count=2)
    return q_ready, q_free


@gluon.jit
def _routed_fwd_kernel(Q, q_desc, k_desc, v_desc, OP, LP, ENTRIES, ROWS, ROWPTR, qk_scale, Tq, Tk,
                       NB, hq, group, nsel, split, block_size, HEAD_DIM: gl.constexpr,
                       CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
                       num_warps: gl.constexpr, PRODUCER_WARPS: gl.constexpr):
    """q_desc: only the Q tiles' shape, dtype and shared layout (the rows are gathered)."""
    gl.static_assert(num_warps == CONSUMER_WARPS)
    grp, c0, nch = routed_work(ROWPTR, NB, split)
    if nch == 0:
        return

    q_smem = gl.allocate_shared_memory(q_desc.dtype, [4, HALF_M, HEAD_DIM], q_desc.layout)
    q_ready, q_free = chunk_barriers()
    k_smem, v_smem, k_bar, v_bar, empty = kv_ring(k_desc, v_desc, STAGES)
    fence_async_shared()

    consumer_args = (OP, LP, ENTRIES, ROWPTR, q_smem, k_smem, v_smem, q_ready, q_free, k_bar,
                     v_bar, empty, qk_scale, Tq, NB, nsel, block_size, grp, c0, split, nch)
    gl.warp_specialize([
        (_entries_0_63, consumer_args),
        (_entries_64_127, consumer_args),
        (_producer, (Q, ROWS, ROWPTR, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, q_free,
                     k_bar, v_bar, empty, Tq, Tk, hq, group, NB, block_size, grp, c0, split,
                     nch)),
    ], [CONSUMER_WARPS, PRODUCER_WARPS], [CONSUMER_REGS, PRODUCER_REGS])


# launch

def routed_scope_error(q, k, block_size, has_docs: bool) -> str | None:
    """Why the Gluon routed forward cannot run these inputs, or None."""
    why = scope_error(q, k)
    if why is not None:
        return why.replace("Gluon flash forward", "MoBA Gluon routed forward")
    if has_docs:
        return "the MoBA Gluon routed forward takes no documents (cu_seqlens)"
    if not block_size or block_size % BLOCK_N.value:
        return f"the MoBA Gluon routed forward needs block_size a multiple of " \
               f"{BLOCK_N.value}; got block_size={block_size}"
    return None


def routed_fwd_gluon(q, k, v, index, nb: int, nsel: int, scale_log2: float, block_size: int,
                     op, lp, splits=None):
    """routed.routed_fwd's (OP, LP) written into op, lp through the Gluon kernel; ValueError
    outside its scope (documents are the caller's to rule out: it passes the block table's nb
    blocks of block_size keys from 0). splits: tuning override of SPLIT."""
    why = routed_scope_error(q, k, block_size, False)
    if why is not None:
        raise ValueError(why)
    B, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    rowptr, entries = index
    rows = entries // nsel     # the entries' query rows: no division in the producer
    token_stride(k, v)
    split = splits or SPLIT
    # the producer's hq: the full tensor's head count, also for a head piece (heads.gather_heads)
    _routed_fwd_kernel[(nb * split, B * hq)](
        q, tile_desc(q, HALF_M.value), tile_desc(k, BLOCK_N.value), tile_desc(v, BLOCK_N.value),
        op, lp, entries, rows, rowptr, scale_log2, tq, tk, nb, gather_heads(q), hq // hkv, nsel,
        split, block_size, HEAD_DIM=d, CONSUMER_REGS=CONSUMER_REGS, PRODUCER_REGS=PRODUCER_REGS,
        num_warps=CONSUMER_WARPS, PRODUCER_WARPS=PRODUCER_WARPS)
    return op, lp
