"""Element offsets past 2^31 (T·H·D >= 2^31 per sequence) under the Triton interpreter, cheaply.

The kernels form offsets as an int64 base (batch, the tile's first row, or the chunk's first
key, times the row stride) plus int32 offsets inside the tile (attn/common/__init__.py). A product
row · stride in int32 wraps at 2^31 elements; these cases put the rows a program touches past
that point while the program does little work:
  - the big tensors (4 GiB of fp16, T·H·D just over 2^31) come from torch.empty: untouched
    pages are never committed, and the interpreter runs on the CPU tensors in place (no copy),
    so only the few rows written here and by the kernels take memory;
  - the programs that run touch only the last rows: a few queries at the end (q_offset) with a
    sliding window or a short last block / document, or one program of a kernel launched
    through a one-program wrapper at the last query / key tile (the *_program functions).
Reference: the same computation on the last rows alone (a slice, where the offsets are small).
With 32-bit offsets the wrapped addresses point below the tensors: the case crashes (segfault)
or reads wrong rows. Each case runs in a subprocess, so a crash is reported as a failure
instead of ending the test session; a machine that refuses the 4 GiB address-space reservations
skips them. What this cannot reach cheaply (kernels whose grid covers every key block of the
sequence: flash / MoBA dK/dV launches, the NSA compressed backward, the MoBA gate, the linear
scan) is covered on the GPU (test_*_gpu.py, `pytest -m gpu`).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import triton
import triton.language as tl

from attn.flash import bwd as flash_bwd, fwd as flash_fwd

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SKIP_RC = 77  # the subprocess could not reserve the big tensors

CASES = ["flash_fwd_op", "flash_fwd_rows", "flash_dq", "flash_dkdv", "moba_fwd_dq",
         "nsa_cmp_fwd", "nsa_slc_fwd_dq", "lightning_fwd"]


@pytest.mark.parametrize("case", CASES)
def test_offsets_past_2_31(case, fresh_seed):
    env = dict(os.environ, TRITON_INTERPRET="1", ATTN_IMPL="triton", TEST_SEED=str(fresh_seed),
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, os.path.abspath(__file__), case], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    if r.returncode == SKIP_RC:
        pytest.skip(r.stdout.strip()[-300:])
    assert r.returncode == 0, f"rc={r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    print(r.stdout)


# ---------------------------------------------------------------------------------------------
# the cases (run as `python tests/attn/test_large_offsets.py CASE`, TRITON_INTERPRET=1)

def _setup():
    import torch
    torch.manual_seed(int(os.environ.get("TEST_SEED", "0")))
    return torch


def big(torch, shape, dtype, fill_from=None):
    """torch.empty (pages committed only where written); rows [fill_from:] of dim 1 random."""
    try:
        t = torch.empty(shape, dtype=dtype)
    except RuntimeError as e:  # the address space reservation was refused
        print(f"cannot reserve {shape} {dtype}: {e}")
        sys.exit(SKIP_RC)
    if fill_from is not None:
        t[:, fill_from:] = torch.randn(t[:, fill_from:].shape).to(dtype)
    return t


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-6)).item()


def close(name, a, b, tol=1e-2):
    err = rel(a, b)
    print(f"{name}: rel err {err:.2e}")
    assert err < tol, f"{name}: relative error {err:.3e} >= {tol}"


# flash: H = 2, D = 256, so row r starts at element r·512 and rows >= 2^22 are past 2^31 (few
# heads: few programs for the interpreter)
F_H, F_D = 2, 256
F_T = 2 ** 22 + 96      # T·H·D = 2^31 + 96·512
F_TAIL = 256            # rows [T - 256, T): straddle the 2^31 boundary, hold the random data
F_W = 64                # sliding window: the last rows see only the tail
F_BM, F_BN = 32, 16


def _flash_tail():
    """q, k, v, do big [1, T, H, D] fp16, random on the tail; the tail slices; their reference
    o, lse (the tail alone, q_offset 0: exact for rows >= W - 1 of the tail) and gradients."""
    torch = _setup()
    from attn.flash.ref import flash_attn_ref, flash_bwd_ref
    s0 = F_T - F_TAIL
    q, k, v, do = (big(torch, (1, F_T, F_H, F_D), torch.float16, s0) for _ in range(4))
    qs, ks, vs, dos = (t[:, s0:] for t in (q, k, v, do))
    o_s, lse_s = flash_attn_ref(qs, ks, vs, window=F_W)
    grads = flash_bwd_ref(dos, qs, ks, vs, o_s, lse_s, window=F_W)
    return torch, (q, k, v, do), (qs, ks, vs, dos), (o_s, lse_s), grads


def case_flash_fwd_op():
    """The public forward (no T·H·D refusal any more): 32 queries at the end, window 64, keys
    [1, T, H, D]: every key chunk the kernel loads sits past 2^31."""
    torch = _setup()
    from attn.flash import op
    from attn.flash.ref import flash_attn_ref
    tq, s0 = 32, F_T - F_TAIL
    k, v = (big(torch, (1, F_T, F_H, F_D), torch.float16, s0) for _ in range(2))
    q = torch.randn(1, tq, F_H, F_D).half()
    o, lse = op.flash_fwd(q, k, v, q_offset=F_T - tq, window=F_W)
    o_r, lse_r = flash_attn_ref(q, k[:, s0:], v[:, s0:], q_offset=F_T - tq - s0, window=F_W)
    close("o", o, o_r)
    close("lse", lse, lse_r, 1e-4)


def _flash_meta(dtype):
    from attn.common.launch import dot_precision
    return dict(HQ=F_H, HKV=F_H, HEAD_DIM=F_D, HAS_SEG=False, HAS_WINDOW=True,
                DOT_PREC=dot_precision(dtype))


def case_flash_fwd_rows():
    """The forward program of the last query tile (Q / O rows past 2^31)."""
    from attn.common.jit import LOG2E_F
    torch, (q, k, v, _), _, (o_s, lse_s), _ = _flash_tail()
    o = big(torch, q.shape, q.dtype)
    lse = torch.zeros(1, F_H, F_T)
    _fwd_tile[(1, F_H)](F_T - F_BM, q, k, v, o, lse, F_D ** -0.5 * LOG2E_F, F_W, F_T, F_T,
                       BLOCK_M=F_BM, BLOCK_N=F_BN, **_flash_meta(q.dtype))
    close("o", o[:, -F_BM:], o_s[:, -F_BM:])
    close("lse", lse[..., -F_BM:], lse_s[..., -F_BM:], 1e-4)


# one-program wrappers: the flash programs of one chosen tile (grid (1, B·H))
@triton.jit
def _fwd_tile(start_m, Q, K, V, O, LSE, qk_scale, window, Tq, Tk, HQ: tl.constexpr,
              HKV: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, HAS_SEG: tl.constexpr, HAS_WINDOW: tl.constexpr,
              DOT_PREC: tl.constexpr):
    flash_fwd._fwd_program(start_m, tl.program_id(1), Q, K, V, O, LSE, LSE, LSE, LSE, qk_scale,
                           0, window, Tq, Tk, HQ, HKV, HEAD_DIM, BLOCK_M, BLOCK_N, HAS_SEG,
                           HAS_WINDOW, False, DOT_PREC, False)


@triton.jit
def _dq_tile(start_m, Q, K, V, DO, LSE, DELTA, DQ, scale, qk_scale, window, Tq, Tk,
             HQ: tl.constexpr, HKV: tl.constexpr, HEAD_DIM: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_SEG: tl.constexpr,
             HAS_WINDOW: tl.constexpr, DOT_PREC: tl.constexpr, TMA: tl.constexpr):
    flash_bwd._dq_program(start_m, tl.program_id(1), Q, K, V, DO, LSE, DELTA, DQ, LSE, scale,
                          qk_scale, 0, window, Tq, Tk, HQ, HKV, HEAD_DIM, BLOCK_M, BLOCK_N,
                          HAS_SEG, HAS_WINDOW, DOT_PREC, TMA, False)


@triton.jit
def _dkdv_tile(start_n, Q, K, V, DO, LSE, DELTA, DK, DV, scale, qk_scale, window, Tq, Tk,
               HQ: tl.constexpr, HKV: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_SEG: tl.constexpr,
               HAS_WINDOW: tl.constexpr, DOT_PREC: tl.constexpr, TMA: tl.constexpr):
    flash_bwd._dkdv_program(start_n, tl.program_id(1), Q, K, V, DO, LSE, DELTA, DK, DV, LSE, LSE,
                            scale, qk_scale, 0, window, Tq, Tk, HQ, HKV, HEAD_DIM, BLOCK_M,
                            BLOCK_N, HAS_SEG, HAS_WINDOW, DOT_PREC, TMA)


def _tma_modes(kind, *tensors):
    """Pointer loads, then TMA descriptors where use_tma takes them (the interpreter
    does unless FLASH_TMA=0; the call also sets the descriptors' scratch allocator)."""
    from attn.common.launch import use_tma
    return (False, True) if use_tma(kind, *tensors) else (False,)


def _bwd_inputs(torch, o_s, lse_s, dos):
    """lse and delta [1, H, T] holding the tail's values (rows the programs read)."""
    lse = torch.zeros(1, F_H, F_T)
    delta = torch.zeros(1, F_H, F_T)
    lse[..., -F_TAIL:] = lse_s
    delta[..., -F_TAIL:] = (o_s.float() * dos.float()).sum(-1).transpose(1, 2)
    return lse, delta


def case_flash_dq():
    """The dQ program of the last query tile: Q, dO, dQ rows and K, V chunks past 2^31, through
    pointers and through TMA descriptors."""
    from attn.common.jit import LOG2E_F
    torch, (q, k, v, do), (qs, ks, vs, dos), (o_s, lse_s), (dq_s, _, _) = _flash_tail()
    lse, delta = _bwd_inputs(torch, o_s, lse_s, dos)
    scale = F_D ** -0.5
    for tma in _tma_modes("dq", k, v):
        dq = big(torch, q.shape, q.dtype)
        _dq_tile[(1, F_H)](F_T - F_BM, q, k, v, do, lse, delta, dq, scale, scale * LOG2E_F, F_W,
                           F_T, F_T, BLOCK_M=F_BM, BLOCK_N=F_BN, TMA=tma,
                           **_flash_meta(q.dtype))
        close(f"dq (TMA={tma})", dq[:, -F_BM:], dq_s[:, -F_BM:])


def case_flash_dkdv():
    """The dK/dV program of the last key tile: K, V, dK, dV rows and the Q, dO rows it streams
    past 2^31, through pointers and through TMA descriptors."""
    from attn.common.jit import LOG2E_F
    torch, (q, k, v, do), (qs, ks, vs, dos), (o_s, lse_s), (_, dk_s, dv_s) = _flash_tail()
    lse, delta = _bwd_inputs(torch, o_s, lse_s, dos)
    scale, bn = F_D ** -0.5, 32
    for tma in _tma_modes("dkdv", q, do):
        dk, dv = (big(torch, k.shape, k.dtype) for _ in range(2))
        _dkdv_tile[(1, F_H)](F_T - bn, q, k, v, do, lse, delta, dk, dv, scale, scale * LOG2E_F,
                           F_W, F_T, F_T, BLOCK_M=16, BLOCK_N=bn, TMA=tma,
                           **_flash_meta(q.dtype))
        close(f"dk (TMA={tma})", dk[:, -bn:], dk_s[:, -bn:])
        close(f"dv (TMA={tma})", dv[:, -bn:], dv_s[:, -bn:])


def case_moba_fwd_dq():
    """MoBA, H = 4, D = 128 (rows >= 2^22 past 2^31), blocks of 8192, topk = 1 (own block only:
    no gate over the whole sequence): 16 queries at the end, in a last block of 64 keys wholly
    past 2^31; the public op, then the forward and dQ primitives, against causal attention over
    the last block. (The routed kernels have one program per block of the sequence: too slow
    under the interpreter at this length; they share chunk_scores with the own block.)"""
    torch = _setup()
    from attn.common.softmax import bwd_delta
    from attn.flash.ref import flash_attn_ref, flash_bwd_ref
    from attn.moba import moba_attn
    from attn.moba.fwd import dq_triton
    from attn.moba.op import moba_fwd
    H, D, bs, tq = 4, 128, 8192, 16
    T = 2 ** 22 + 2 * bs + 64
    s_own = T - 64                                           # the last block's first key
    q = torch.randn(1, tq, H, D).half()
    k, v = (big(torch, (1, T, H, D), torch.float16, s_own) for _ in range(2))
    kw = dict(block_size=bs, topk=1, q_offset=T - tq)
    o_r, lse_r = flash_attn_ref(q, k[:, s_own:], v[:, s_own:], q_offset=T - tq - s_own)
    close("o (moba_attn)", moba_attn(q, k, v, **kw), o_r)
    o, lse, sel, table, index = moba_fwd(q, k, v, **kw)
    close("o", o, o_r)
    close("lse", lse, lse_r, 1e-4)
    do = torch.randn_like(q)
    dq = dq_triton(do, q, k, v, lse, bwd_delta(o, do), sel, table, D ** -0.5, T - tq, index, bs)
    close("dq", dq, flash_bwd_ref(do, q, k[:, s_own:], v[:, s_own:], o, lse,
                                  q_offset=T - tq - s_own)[0])


def case_nsa_cmp_fwd():
    """NSA compressed branch: k_cmp [1, Tc, 4, 128] with Tc > 2^22 compressed rows (rows past
    2^31); 16 queries in a short last document see only its 15 compressed rows."""
    torch = _setup()
    from attn.nsa.cmp import cmp_attn_fwd
    from attn.nsa.ref import cmp_attn_ref, num_cmp_blocks
    H, D, cb, cs, last, tq = 4, 128, 32, 16, 256, 16
    tk = 16 * (2 ** 22 + 64) + last
    n_last = num_cmp_blocks(last, cb, cs)
    tc = num_cmp_blocks(tk - last, cb, cs) + n_last
    kc, vc = (big(torch, (1, tc, H, D), torch.float16, tc - n_last) for _ in range(2))
    q = torch.randn(1, tq, H, D).half()
    cu = torch.tensor([0, tk - last, tk], dtype=torch.int32)
    o, lse = cmp_attn_fwd(q, kc, vc, scale=None, cmp_block=cb, cmp_stride=cs, cu_seqlens=cu,
                          q_offset=tk - tq, tk=tk)
    o_r, lse_r = cmp_attn_ref(q, kc[:, tc - n_last:], vc[:, tc - n_last:], cmp_block=cb,
                              cmp_stride=cs, q_offset=last - tq, tk=last)
    close("o", o, o_r)
    close("lse", lse, lse_r, 1e-4)


def case_nsa_slc_fwd_dq():
    """NSA selected branch, H = 4, D = 128, blocks of 64: 16 queries at the end select the last
    two blocks (past 2^31): forward and the dQ launch, against causal attention over them."""
    torch = _setup()
    from attn.common.softmax import bwd_delta
    from attn.flash.ref import flash_attn_ref, flash_bwd_ref
    from attn.common.documents import block_table
    from attn.nsa import slc
    H, D, sb, tq = 4, 128, 64, 16
    T = 2 ** 22 + 2 * sb
    s0 = T - 2 * sb
    q = torch.randn(1, tq, H, D).half()
    k, v = (big(torch, (1, T, H, D), torch.float16, s0) for _ in range(2))
    _, _, blk_start, blk_end = block_table(None, T, sb, q.device)
    nb = blk_start.numel()
    sel = torch.tensor([nb - 1, nb - 2], dtype=torch.int32).expand(1, tq, H, 2).contiguous()
    scale = D ** -0.5
    o_r, lse_r = flash_attn_ref(q, k[:, s0:], v[:, s0:], q_offset=T - tq - s0)
    for tma in (False, True):  # the forward's K / V tiles by pointers, then by descriptors
        slc.TMA["fwd"] = tma
        o, lse = slc.slc_attn_fwd(q, k, v, sel, blk_start, blk_end, scale=scale, sel_block=sb,
                                  q_offset=T - tq)
        close(f"o (TMA={tma})", o, o_r)
        close(f"lse (TMA={tma})", lse, lse_r, 1e-4)
    # dQ only (the dK/dV launch has one program per block of the sequence)
    do = torch.randn_like(q)
    dq = torch.empty_like(q)
    slc._launch_rows(q, k, v, dq, lse, do, bwd_delta(o, do), sel, blk_start, blk_end, scale, sb,
                     T - tq, True)
    close("dq", dq, flash_bwd_ref(do, q, k[:, s0:], v[:, s0:], o, lse,
                                  q_offset=T - tq - s0)[0])



def case_lightning_fwd():
    """The lightning (decayed linear) scan kernels, H = 4, D = 128 (rows >= 2^22 past 2^31), on
    the last 64 rows of the sequence given as the one segment of a segment table (the kernels'
    document layout; the launches of op.py list every segment of the sequence), with an initial
    state: the three passes against the chunked reference on those rows."""
    torch = _setup()
    from attn.linear import kernels as K, ref as R
    H, D, L = 4, 128, 64
    T = 2 ** 22 + L
    s0 = T - L
    q, k, v = (big(torch, (1, T, H, D), torch.float16, s0) for _ in range(3))
    slopes = torch.tensor([0.0, 0.01, 0.1, 1.0])
    init = torch.randn(1, H, D, D)
    scale = D ** -0.5
    seg_tab = torch.tensor([0, s0, T], dtype=torch.int32)        # (document, start, end)
    doc_seg = torch.tensor([0, 1], dtype=torch.int32)
    flags = dict(H=H, DA=D, DV=D, SEG=L, REVERSE=False, HAS_DECAY=True, VARLEN=True)
    st = torch.empty(1, H, D, D)
    K.seg_state_kernel[(H * 2 * 2,)](k, v, slopes, st, seg_tab, T, 1, 1.0, BA=64, BV=64, BT=64,
                                     DOT_PREC="tf32", **flags)
    final = torch.empty(1, H, D, D)
    K.state_scan_kernel[(H, 4, 4)](st, init, final, slopes, seg_tab, doc_seg, T, 1, BA=32, BV=32,
                                   HAS_INIT=True, **flags)
    o = big(torch, q.shape, q.dtype)
    K.chunk_out_kernel[(H * 2,)](q, k, v, st, D, 1, o, slopes, seg_tab, T, 1, scale, scale, 1.0,
                                 BV=64, BT=64, DOT_PREC="tf32", **flags)
    o_r, final_r = R.chunked(q[:, s0:], k[:, s0:], v[:, s0:], slopes, scale=scale,
                             initial_state=init)
    close("o", o[:, s0:], o_r)
    close("final state", final, final_r)


if __name__ == "__main__":
    globals()["case_" + sys.argv[1]]()
    print("ok")
