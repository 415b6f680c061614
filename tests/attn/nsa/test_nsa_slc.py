"""NSA selected-block kernels (attn/nsa/slc.py) against the dense definition `slc_attn_ref`,
under the Triton interpreter on CPU; GPU sizes are marked `gpu`.

Selections are random but valid: for each (b, query i, KV head) the query's own block plus
distinct random causal blocks of its document (optionally NSA's forced ones: the document's
first block and the previous block), a random number of them (−1 in the other slots), slot order
shuffled. Outputs, lse, dq, dk, dv are compared with slc_attn_ref computed in float64 on the same
inputs (upstream gradient random); kernel outputs are NaN-poisoned (alloc.empty swapped for
a NaN-filled allocator) so unwritten elements fail.

Error measure: relative norm ||x − x64|| / ||x64|| (denominator floored at an rms of 0.05).
Rules: fp32 inputs: error <= 1e-5. bf16 / fp16 inputs: error <= 2 · (ref.py's own error in that
dtype) + 1e-4 and < 1e-2 (ref.py computes in fp32 and rounds its result: "at most twice the
output's own rounding"). lse (fp32 in every case): error <= 1e-5.
"""
from __future__ import annotations

import pytest
import torch

from attn.common import alloc
from attn.common.documents import block_table
from attn.nsa import slc, slc_dkdv, union
from attn.nsa.ref import slc_attn_ref
from attn.nsa.slc import slc_attn, slc_attn_bwd, slc_attn_fwd
from attn.nsa.slc_dkdv import inverse_index, work_items

bf16, fp16 = torch.bfloat16, torch.float16


def nan_empty(shape, dtype, device):
    """Poisoned outputs: every element the kernels fail to write stays NaN (int32: −7)."""
    if dtype == torch.int32:
        return torch.full(shape, -7, dtype=dtype, device=device)
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(0.05 * b.numel() ** 0.5)).item()


def random_docs(total, n_docs):
    """Uneven document lengths summing to `total`, with at least one document of length 1."""
    cuts = torch.randperm(total - 1)[: max(n_docs - 2, 0)] + 1
    cuts = torch.cat([cuts, torch.tensor([1])]).unique().sort().values
    return torch.cat([torch.tensor([0]), cuts, torch.tensor([total])]).to(torch.int32)


def random_sel(table, B, tq, hkv, nsel, q_offset=0, nsa=False, partial=True, device="cpu"):
    """int32 [B, Tq, Hkv, NSEL]: own block + distinct random causal blocks of the document
    (nsa: also the document's first and the previous block), −1 padding, shuffled slots."""
    kblk, firstb, _, _ = (t.long().to(device) for t in table)
    nb = table[2].numel()
    pos = torch.arange(tq, device=device) + q_offset
    j = torch.arange(nb, device=device)
    own, first = kblk[pos][:, None], firstb[pos][:, None]
    score = torch.rand(B, tq, hkv, nb, device=device)
    score = score.masked_fill(((j < first) | (j > own))[None, :, None, :], -1.0)
    forced = (j == own) | ((j == first) | (j == own - 1)) & (j >= first) if nsa else j == own
    score = score.masked_fill(forced[None, :, None, :], 2.0)
    top, idx = score.topk(min(nsel, nb), dim=-1)
    sel = torch.where(top >= 0, idx, -1)
    if partial:  # keep a random number of blocks per row (at least the forced ones)
        keep = torch.randint(1, nsel + 1, sel.shape[:3] + (1,), device=device)
        sel = torch.where((torch.arange(sel.shape[-1], device=device) < keep) | (top > 1.5),
                          sel, -1)
    sel = torch.cat([sel, sel.new_full(sel.shape[:3] + (nsel - sel.shape[-1],), -1)], -1)
    perm = torch.rand(sel.shape, device=device).argsort(-1)
    return sel.gather(-1, perm).to(torch.int32).contiguous()


def check_case(monkeypatch, *, B=1, Tq=64, Tk=None, Hq=2, Hkv=None, D=16, sel_block=8, nsel=4,
               dtype=torch.float32, q_offset=0, cu=None, nsa=False, partial=True,
               device="cpu", exact_dtype=torch.float64):
    Tk = Tq if Tk is None else Tk
    Hkv = Hq if Hkv is None else Hkv
    monkeypatch.setattr(alloc, "empty", nan_empty)
    cu_t = None if cu is None else torch.as_tensor(cu, dtype=torch.int32, device=device)
    table = block_table(cu_t, Tk, sel_block, device)
    sel = random_sel(table, B, Tq, Hkv, nsel, q_offset, nsa, partial, device)
    _, _, bs, be = table
    q = torch.randn(B, Tq, Hq, D, device=device).to(dtype)
    k = torch.randn(B, Tk, Hkv, D, device=device).to(dtype)
    v = torch.randn(B, Tk, Hkv, D, device=device).to(dtype)
    do = torch.randn(B, Tq, Hq, D, device=device).to(dtype)

    def run(dt):
        leaves = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        o, lse = slc_attn_ref(*leaves, sel, bs, be, q_offset=q_offset)
        return (o, lse, *torch.autograd.grad(o, leaves, do.to(o.dtype)))

    kw = dict(scale=D ** -0.5, sel_block=sel_block, q_offset=q_offset)
    o, lse = slc_attn_fwd(q, k, v, sel, bs, be, **kw)
    got = (o, lse, *slc_attn_bwd(do, q, k, v, o, lse, sel, bs, be, **kw))
    exact, mine = run(exact_dtype), run(dtype)
    report = {}
    for name, g, x, r in zip(["o", "lse", "dq", "dk", "dv"], got, exact, mine):
        assert g.shape == x.shape and g.dtype == (torch.float32 if name == "lse" else dtype)
        assert torch.isfinite(g).all(), f"{name}: NaN/inf (unwritten or broken elements)"
        e_k, e_r = rel(g, x), rel(r, x)
        report[name] = (e_k, e_r)
        if dtype == torch.float32 or name == "lse":
            assert e_k <= 1e-5, (name, e_k, e_r)
        else:
            assert e_k < 1e-2, (name, e_k)
            assert e_k <= 2 * e_r + 1e-4, (name, "kernel", e_k, "ref.py", e_r)
    return report, sel, table


@pytest.mark.parametrize("case", [
    dict(Tq=64, Hq=2, D=16, sel_block=8, nsel=4),                                 # G 1
    dict(Tq=84, Hq=4, Hkv=2, D=32, sel_block=16, nsel=3),                         # G 2, T % 16
    dict(Tq=100, Hq=4, Hkv=1, D=16, sel_block=8, nsel=5, cu="docs", nsa=True),    # G 4, documents
    dict(B=2, Tq=48, Hq=32, Hkv=2, D=16, sel_block=8, nsel=4, nsa=True),          # G 16, batch
    dict(Tq=40, Hq=64, Hkv=1, D=16, sel_block=8, nsel=3),                         # G 64
    dict(Tq=60, Hq=6, Hkv=2, D=16, sel_block=12, nsel=6),                         # G 3, odd block
    dict(Tq=48, Tk=130, q_offset=70, Hq=4, Hkv=2, D=16, sel_block=8, nsel=6, cu="docs"),
    dict(B=2, Tq=60, Hq=2, Hkv=1, D=16, sel_block=16, nsel=16, partial=False),   # −1 slots
    dict(Tq=100, Hq=2, Hkv=1, D=16, sel_block=4, nsel=32, nsa=True),              # NSEL 32
    dict(Tq=90, Hq=8, Hkv=2, D=16, sel_block=32, nsel=3, nsa=True),               # block > 16
    dict(Tq=96, Hq=8, Hkv=2, D=32, sel_block=16, nsel=4, cu="docs", nsa=True, dtype=bf16),
    dict(Tq=40, Tk=112, q_offset=60, Hq=16, Hkv=1, D=16, sel_block=8, nsel=4, dtype=fp16),
    dict(Tq=50, Hq=4, Hkv=4, D=16, sel_block=8, nsel=4, dtype=bf16),              # G 1 bf16
], ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()).replace("torch.", ""))
def test_matches_ref(monkeypatch, case):
    case = dict(case)
    if case.get("cu") == "docs":
        case["cu"] = random_docs(case.get("Tk", case["Tq"]), 6)
    rep, _, _ = check_case(monkeypatch, **case)
    print({k: f"{a:.2e} (ref {b:.2e})" for k, (a, b) in rep.items()})


@pytest.mark.parametrize("tiles", ["coarse", "fine"])
@pytest.mark.parametrize("case", [
    dict(Tq=84, Hq=4, Hkv=2, D=32, sel_block=16, nsel=3),                         # G 2, T % 16
    dict(Tq=100, Hq=4, Hkv=1, D=16, sel_block=8, nsel=5, cu="docs", nsa=True),    # G 4, documents
    dict(Tq=40, Tk=112, q_offset=60, Hq=16, Hkv=1, D=16, sel_block=8, nsel=4, dtype=fp16),
    dict(Tq=96, Hq=8, Hkv=2, D=32, sel_block=16, nsel=4, cu="docs", nsa=True, dtype=bf16),
], ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()).replace("torch.", "")
   if isinstance(c, dict) else c)
def test_forced_tiling_matches_ref(monkeypatch, case, tiles):
    """Each tiling alone (slc.TILES = coarse: FWD_ROWS-row tiles; fine: FINE_ROWS rows) is exact
    against the definition; the adaptive default mixes the two per tile."""
    monkeypatch.setattr(slc, "TILES", tiles)
    case = dict(case)
    if case.get("cu") == "docs":
        case["cu"] = random_docs(case.get("Tk", case["Tq"]), 6)
    check_case(monkeypatch, **case)


@pytest.mark.parametrize("fwd,dq", [(False, False), (True, True)], ids=["pointers", "tma-both"])
def test_kv_loads_pointer_and_tma(monkeypatch, fwd, dq):
    """The default takes TMA descriptors for the forward's K/V tiles and pointer loads for the
    dQ (slc.TMA); both load paths of both passes stay exact (batch 2: a descriptor over
    [B·Tk, Hkv·D] reads the next batch past a block's end, masked; documents: blocks shorter
    than BLOCK_N)."""
    monkeypatch.setattr(slc, "TMA", {"fwd": fwd, "dq": dq})
    check_case(monkeypatch, B=2, Tq=72, Hq=8, Hkv=2, D=16, sel_block=16, nsel=3, nsa=True)
    check_case(monkeypatch, Tq=100, Hq=4, Hkv=1, D=16, sel_block=8, nsel=5, nsa=True,
               cu=random_docs(100, 6))


def test_fine_tiles_rule():
    """A coarse tile goes to the fine launch when COARSE_STEP_COST·U_coarse >
    FINE_STEP_COST·(sum of its fine tiles' U); the last coarse tile may have fewer fine ones."""
    uc = torch.tensor([[13, 10, 3]], dtype=torch.int32)
    uf = torch.tensor([[4, 4, 4, 4, 5, 5, 5, 5, 3]], dtype=torch.int32)   # 3 coarse x 4, short
    want = [int(slc.COARSE_STEP_COST * 13 > slc.FINE_STEP_COST * 16),
            int(slc.COARSE_STEP_COST * 10 > slc.FINE_STEP_COST * 20),
            int(slc.COARSE_STEP_COST * 3 > slc.FINE_STEP_COST * 3)]
    assert slc.fine_tiles(uc, uf, 4).tolist() == [want]
    assert want == [1, 0, 1]


@pytest.mark.parametrize("shared_half", [0, 1])
def test_adaptive_tiles_mix_and_agree(monkeypatch, shared_half):
    """One half of the positions shares its picks per 32 queries (coarse tiles), the other half
    picks at random (fine tiles). Each launch alone writes exactly the rows of its tiles (the
    others stay NaN), and the pair's o / lse / dQ equal the coarse tiling's (fp32; the same
    blocks in the same order per row). (Against the definition: test_forced_tiling_matches_ref.)"""
    monkeypatch.setattr(alloc, "empty", nan_empty)
    monkeypatch.setattr(slc, "FINE_STEP_COST", 1)     # clear margins at these small sizes
    T, hq, hkv, sb, nsel = 64, 16, 1, 4, 4                         # G 16: coarse 4, fine 1 pos
    table = block_table(None, T, sb, "cpu")
    sel = random_sel(table, 1, T, hkv, nsel, partial=False)
    half = torch.arange(T // 2) + shared_half * T // 2
    sel[:, half] = sel[:, (half // 32) * 32]                       # causal: the first's picks
    q, do = torch.randn(1, T, hq, 16), torch.randn(1, T, hq, 16)
    k, v = (torch.randn(1, T, hkv, 16) for _ in range(2))
    delta = torch.randn(1, hq, T)
    plans = slc._tile_plans(q, k, sel, table[2], table[3])
    assert [p[3] for p in plans] == [1, 2]
    flags = plans[0][2][0]
    assert 0 < int(flags.sum()) < flags.numel(), flags
    tile_of_pos = torch.arange(T) // plans[0][0]["QPP"]

    def run():
        o, lse = slc_attn_fwd(q, k, v, sel, table[2], table[3], scale=0.25, sel_block=sb)
        dq = nan_empty(q.shape, q.dtype, "cpu")
        slc._launch_rows(q, k, v, dq, lse, do, delta, sel, table[2], table[3], 0.25, sb, 0, True)
        return o, lse, dq
    got = run()
    for which in (0, 1):
        monkeypatch.setattr(slc, "_tile_plans", lambda *a, _p=plans[which]: [_p])
        o, lse, dq = run()
        want = flags[tile_of_pos] == which                      # positions of this launch
        assert torch.equal(~torch.isnan(lse[0]).any(0), want), which
        assert torch.equal(~torch.isnan(o[0]).any(-1).any(-1), want), which
        assert torch.equal(~torch.isnan(dq[0]).any(-1).any(-1), want), which
    monkeypatch.undo()
    monkeypatch.setattr(alloc, "empty", nan_empty)
    monkeypatch.setattr(slc, "TILES", "coarse")
    for name, a, b in zip(("o", "lse", "dq"), got, run()):
        assert torch.isfinite(a).all(), name
        assert rel(a, b) < 1e-6, (name, rel(a, b))
    monkeypatch.setattr(slc, "TILES", "tiny")
    with pytest.raises(ValueError, match="TILES='tiny'"):
        run()


def test_heavy_blocks_are_split_and_backward_is_deterministic(monkeypatch):
    """Block 0 (selected by every query) is split over several programs; two backward passes
    give identical bits; the unsplit run agrees to rounding."""
    monkeypatch.setattr(alloc, "empty", nan_empty)
    T, hq, hkv, sb, nsel = 96, 4, 2, 8, 4
    table = block_table(None, T, sb, "cpu")
    sel = random_sel(table, 1, T, hkv, nsel, nsa=True)
    _, _, counts = inverse_index(sel, table[2].numel())
    split = slc_dkdv.split_rows(T, nsel, table[2].numel())
    assert int(counts.max()) >= 2 * split                        # something is split
    q = torch.randn(1, T, hq, 16, requires_grad=True)
    k, v = (torch.randn(1, T, hkv, 16, requires_grad=True) for _ in range(2))
    do = torch.randn(1, T, hq, 16)

    def grads():
        return torch.autograd.grad(slc_attn(q, k, v, sel, table[2], table[3], sel_block=sb),
                                   (q, k, v), do)
    g1, g2 = grads(), grads()
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    monkeypatch.setattr(slc_dkdv, "SPLIT_MIN_ROWS", 10 ** 6)         # one program per block
    for a, b in zip(g1, grads()):
        assert rel(a, b) < 1e-6


def test_bwd_given_delta_and_dq_accumulator(monkeypatch):
    """slc_attn_bwd(delta=, dq=): the caller's delta replaces the preprocess; dQ is added to the
    given tensor and returned (both tilings of the adaptive pair add); dK, dV unchanged."""
    monkeypatch.setattr(alloc, "empty", nan_empty)
    T, hq, hkv, sb, nsel = 80, 4, 1, 8, 4
    table = block_table(None, T, sb, "cpu")
    sel = random_sel(table, 1, T, hkv, nsel, nsa=True)
    q = torch.randn(1, T, hq, 16)
    k, v = (torch.randn(1, T, hkv, 16) for _ in range(2))
    kw = dict(scale=0.25, sel_block=sb)
    o, lse = slc_attn_fwd(q, k, v, sel, table[2], table[3], **kw)
    do = torch.randn_like(o)
    dq0, dk0, dv0 = slc_attn_bwd(do, q, k, v, o, lse, sel, table[2], table[3], **kw)
    delta = (o * do).sum(-1).transpose(1, 2).contiguous()
    base = torch.randn_like(q)
    acc = base.clone()
    dq, dk, dv = slc_attn_bwd(do, q, k, v, o, lse, sel, table[2], table[3], **kw, delta=delta,
                              dq=acc)
    assert dq is acc
    for a, b in ((dq, base + dq0), (dk, dk0), (dv, dv0)):
        assert rel(a, b) < 1e-5, rel(a, b)
    with pytest.raises(ValueError, match="dq must be a contiguous"):
        slc_attn_bwd(do, q, k, v, o, lse, sel, table[2], table[3], **kw, dq=acc.double())


@pytest.mark.parametrize("chunk,per", [(None, 1), (4, 1), (None, 2)])
def test_tile_unions_are_sorted_unique_sets(monkeypatch, chunk, per):
    """_union_kernel against sorted(set(...)) per tile, with empty slots, bad ids, a last tile
    past Tq, B = 2, Hkv = 2; chunk=4 takes the GPU's chunked comparisons (CH < U); per=2 puts
    two tiles in one program (3 tiles: the second program's second one does not exist)."""
    monkeypatch.setattr(alloc, "empty", nan_empty)
    if chunk is not None:
        monkeypatch.setattr(union, "_union_chunk", lambda u: chunk)
    B, tq, hq, hkv, nsel, nb = 2, 37, 8, 2, 5, 9
    table = block_table(None, nb * 4, 4, "cpu")
    sel = torch.randint(-2, nb + 2, (B, tq, hkv, nsel), dtype=torch.int32)
    sel[0, 3] = 7                                             # every slot the same block
    q = torch.empty(B, tq, hq, 16)
    meta = slc._meta(q, torch.empty(B, tq, hkv, 16), sel)
    ids_u, ustart, uend, ucnt = union.tile_unions(sel, nb, meta, table[2], table[3], per)
    qpp = meta["QPP"]
    for b in range(B):
        for h in range(hkv):
            for t in range((tq + qpp - 1) // qpp):
                ids = sel[b, t * qpp:(t + 1) * qpp, h].flatten().tolist()
                want = sorted({i for i in ids if 0 <= i < nb})
                n = int(ucnt[b * hkv + h, t])
                assert ids_u[b * hkv + h, t, :n].tolist() == want, (b, h, t)
                assert ustart[b * hkv + h, t, :n].tolist() == table[2][want].tolist()
                assert uend[b * hkv + h, t, :n].tolist() == table[3][want].tolist()


def test_inverse_index_and_work_items():
    table = block_table(random_docs(120, 5), 120, 8, "cpu")
    nb = table[2].numel()
    sel = random_sel(table, 2, 120, 3, 5, nsa=True)
    rowptr, entries, counts = inverse_index(sel, nb)
    for b in range(2):
        for h in range(3):
            for j in range(nb):
                at = (b * 3 + h) * nb + j
                want = (sel[b, :, h] == j).any(-1).nonzero().flatten()
                assert torch.equal(entries[rowptr[at]:rowptr[at + 1]].long(), want)
    split = 7
    bound = 2 * 3 * (120 * 5 // split)
    item, isplit, nsplit, pslot = work_items(counts, split, 2 * 3 * nb + bound)
    real = item < 2 * 3 * nb
    pairs = sorted(zip(item[real].tolist(), isplit[real].tolist()))
    assert pairs == [(i, s) for i in range(2 * 3 * nb) for s in range(int(nsplit[i]))]
    assert bool((item[~real] == 2 * 3 * nb).all()) and bool(real[: int(real.sum())].all())
    size = (counts[item[real].long()] // nsplit[item[real].long()]).tolist()
    assert size == sorted(size, reverse=True)                    # largest first
    multi = nsplit > 1
    assert int((pslot[multi] + nsplit[multi]).max()) <= bound    # partial tiles fit the bound


def test_bad_arguments():
    T, nb = 16, 2
    q, k = torch.randn(1, T, 2, 16), torch.randn(1, T, 1, 16)
    table = block_table(None, T, 8, "cpu")
    bs, be = table[2], table[3]
    sel = random_sel(table, 1, T, 1, 2)
    ok = dict(sel_block=8)
    with pytest.raises(ValueError, match="head dim D=24"):
        slc_attn(torch.randn(1, T, 2, 24), torch.randn(1, T, 1, 24), torch.randn(1, T, 1, 24),
                 sel, bs, be, **ok)
    with pytest.raises(ValueError, match="dtype torch.float64"):
        slc_attn(q.double(), k.double(), k.double(), sel, bs, be, **ok)
    with pytest.raises(ValueError, match="share one dtype"):
        slc_attn(q, k.half(), k, sel, bs, be, **ok)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        slc_attn(torch.randn(1, T, 3, 16), torch.randn(1, T, 2, 16), torch.randn(1, T, 2, 16),
                 sel, bs, be, **ok)
    with pytest.raises(ValueError, match="sel"):
        slc_attn(q, k, k, sel.long(), bs, be, **ok)
    with pytest.raises(ValueError, match="sel"):
        slc_attn(q, k, k, sel[:, :8].contiguous(), bs, be, **ok)
    with pytest.raises(ValueError, match="NSEL <= 32"):
        slc_attn(q, k, k, torch.full((1, T, 1, 33), -1, dtype=torch.int32), bs, be, **ok)
    with pytest.raises(ValueError, match="outside"):
        slc_attn(q, k, k, torch.full((1, T, 1, 2), nb, dtype=torch.int32), bs, be, **ok)
    with pytest.raises(ValueError, match="sel_block=4"):
        slc_attn(q, k, k, sel, bs, be, sel_block=4)              # blocks of 8 keys
    with pytest.raises(ValueError, match="tile"):
        slc_attn(q, k, k, sel, bs, be - 1, **ok)                 # keys left out
    with pytest.raises(ValueError, match="blk_end"):
        slc_attn(q, k, k, sel, bs, be.long(), **ok)
    with pytest.raises(ValueError, match="q_offset=3"):
        slc_attn(q, k, k, sel, bs, be, q_offset=3, **ok)
    with pytest.raises(ValueError, match="q must be contiguous"):
        slc_attn(torch.randn(1, 2, T, 16).transpose(1, 2), k, k, sel, bs, be, **ok)
    with pytest.raises(ValueError, match="group size"):
        slc_attn(torch.randn(1, T, 128, 16), k, k, sel, bs, be, **ok)
    with pytest.raises(ValueError, match="scale"):
        slc_attn(q, k, k, sel, bs, be, scale=-1.0, **ok)


# ---- GPU sizes (pytest -m gpu): bf16, D = 128, NSEL = 16, sel_block = 64, NSA-like selections
# (own, previous and first block forced), vs slc_attn_ref in fp32 (its dense [B, Hq, T, T]
# scores bound T).

@pytest.mark.gpu
@pytest.mark.parametrize("case", [
    dict(Tq=4096, Hq=16, Hkv=4),
    dict(Tq=2048, Hq=64, Hkv=4),
    dict(Tq=4096, Hq=16, Hkv=4, cu="docs"),
    dict(Tq=1024, Tk=4096, q_offset=3072, Hq=16, Hkv=4, split=True),
    dict(Tq=4096, Hq=4, Hkv=4, split=True),                     # G 1
], ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_gpu_cases(monkeypatch, case):
    case = dict(case)
    if case.pop("split", False):  # force the split path for the heavy first blocks
        monkeypatch.setattr(slc_dkdv, "SPLIT_FACTOR", 1)
    if case.get("cu") == "docs":
        case["cu"] = random_docs(case.get("Tk", case["Tq"]), 8)
    rep, _, _ = check_case(monkeypatch, D=128, sel_block=64, nsel=16, dtype=bf16, nsa=True,
                           device="cuda", exact_dtype=torch.float32, **case)
    print({k: f"{a:.2e} (ref {b:.2e})" for k, (a, b) in rep.items()})
