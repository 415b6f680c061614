"""The Gluon forward for Hopper (attn/flash/fwd_gluon.py), the flash forward on Hopper in its
scope (FLASH_FWD_IMPL=auto) or always (=gluon). On the CPU: it compiles for sm_90a with both
triton versions' APIs (at most one value spilled, shared memory within 227 KB), FLASH_FWD_IMPL
is validated, and =gluon outside the scope raises instead of substituting the Triton kernel. On
the GPU (`-m gpu`): the whole op with the Gluon forward and the Triton backward against the
float64 oracle (documents, window, q_offset, GQA, D 64, fp16, a ragged Tq), outputs poisoned,
with flash_testlib's tolerances (within 2x of ref.py's error in 16-bit, lse to 1e-5); and o, lse
against the Triton forward to rounding for every swept (BLOCK_N, STAGES) and causal=False."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from attn.flash import common, flash_attn, flash_fwd
from flash_testlib import GLUON_CASES, check_gluon_case, gluon_case_id, skip_unless_hopper
from import_refusal import assert_import_refuses

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", "..", ".."))


def test_compiles_for_sm90_without_spills():
    env = dict(os.environ, PYTHONPATH=ROOT, TRITON_DEFAULT_FP_FUSION="1")
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, os.path.join(HERE, "gluon_aot.py")], env=env,
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0 and "FAILED" not in r.stdout:
        pytest.skip(f"ahead-of-time compilation unavailable here: {r.stderr[-500:]}")
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    # forward: D 64 / 128 x (default config, 64-key blocks with 4 stages, pooled keys) x bf16 /
    # fp16; dK/dV (bwd_gluon.py, NSA's pooled one, MoBA's gathering one with 1 and 4 producer
    # warps), MoBA's routed forward and dQ, MoBA's tile forward and dQ: D 64 / 128 x bf16 /
    # fp16
    assert r.stdout.count("regs") == 44, r.stdout


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows, d", [(64, 128), (128, 64), (64, 64)])
def test_tile_descriptor(dtype, rows, d):
    """tile_desc (its shared layout built once per (rows, D, dtype)): the [B·T, H·D] view of the
    tensor, [rows, D] tiles, and the default swizzled layout of that tile and dtype."""
    from triton.experimental.gluon import language as gl
    from attn.flash.fwd_gluon import tile_desc
    t = torch.empty(2, 96, 3, d, dtype=dtype)
    for _ in range(2):  # the second call takes the cached layout
        desc = tile_desc(t, rows)
        gdt = gl.bfloat16 if dtype == torch.bfloat16 else gl.float16
        assert desc.layout == gl.NVMMASharedLayout.get_default_for([rows, d], gdt)
        assert list(desc.shape) == [2 * 96, 3 * d] and list(desc.strides) == [3 * d, 1]
        assert list(desc.block_shape) == [rows, d] and desc.base.data_ptr() == t.data_ptr()


def test_unknown_impl_is_refused():
    assert_import_refuses("attn.flash", "FLASH_FWD_IMPL", "gluon-ws",
                          "FLASH_FWD_IMPL='gluon-ws': must be auto, triton or gluon")


def test_gluon_demanded_off_hopper_raises(monkeypatch):
    """=gluon where the kernel cannot run is an error naming the setting, not the Triton kernel
    (auto takes the Triton kernel there: every other flash test runs that way on the CPU)."""
    monkeypatch.setattr(common, "FWD_IMPL", "gluon")
    monkeypatch.setenv("ATTN_IMPL", "triton")
    q = torch.randn(1, 64, 2, 16)
    with pytest.raises(ValueError, match="FLASH_FWD_IMPL=gluon: the Gluon flash forward needs a "
                                         "Hopper GPU"):
        flash_attn(q, q, q)
    with pytest.raises(ValueError, match="FLASH_FWD_IMPL=gluon"):
        flash_fwd(q, q, q, causal=False)



@pytest.mark.gpu
@pytest.mark.parametrize("case", GLUON_CASES, ids=gluon_case_id)
def test_gpu_gluon_forward_in_the_op(monkeypatch, case):
    monkeypatch.setattr(common, "FWD_IMPL", "gluon")
    check_gluon_case(monkeypatch, case)


@pytest.mark.gpu
@pytest.mark.parametrize("D,block_n,stages", [(128, 128, 3), (128, 64, 3), (128, 64, 4),
                                              (64, 128, 4), (64, 64, 4)])
@pytest.mark.parametrize("kw", [dict(), dict(causal=False), dict(window=200, q_offset=256),
                                dict(cu=[0, 1000, 1100, 2304], q_offset=256)],
                         ids=["causal", "full", "window-offset", "docs-offset"])
def test_gpu_gluon_matches_the_triton_forward(monkeypatch, D, block_n, stages, kw):
    """Same o and lse as the Triton forward to rounding (both fp32 softmax, 16-bit P)."""
    skip_unless_hopper()
    from attn.flash.fwd_gluon import fwd_gluon
    from attn.flash.op import _kernel_offset
    from attn.common.documents import key_doc_bounds
    kw = dict(kw)
    causal = kw.pop("causal", True)
    cu = kw.pop("cu", None)
    q_off = kw.get("q_offset", 0)
    tk = 2048 + q_off
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32, device="cuda")
    q = torch.randn(2 if cu is None else 1, 2048, 8, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(q.shape[0], tk, 4, D, device="cuda", dtype=torch.bfloat16)
            for _ in range(2))
    monkeypatch.setenv("FLASH_AUTOTUNE", "0")
    monkeypatch.setattr(common, "FWD_IMPL", "triton")
    o_t, lse_t = flash_fwd(q, k, v, causal=causal, cu_seqlens=cu_t, **kw)
    seg = key_doc_bounds(cu_t, tk)
    o_g, lse_g = fwd_gluon(q, k, v, D ** -0.5, None if seg is None else seg[0],
                           _kernel_offset(causal, q_off, tk), kw.get("window"),
                           block_n=block_n, stages=stages)
    e_o = ((o_g.float() - o_t.float()).norm() / o_t.float().norm()).item()
    e_lse = (lse_g - lse_t).abs().max().item()
    print(f"o {e_o:.2e} lse {e_lse:.2e}")
    # the Triton forward walks 64-key blocks: with the same blocks the two agree to 3e-5 (o, the
    # order of the fp32 sums) and 2e-6 (lse), measured on the H200; 128-key blocks round P to
    # bf16 after other running maxima, and the bf16 outputs then differ by about one rounding
    # (2^-9 at most per element; measured 7e-4 .. 1.4e-3 relative)
    assert e_o < (1e-4 if block_n == 64 else 3e-3) and e_lse < 1e-5, (e_o, e_lse)


@pytest.mark.gpu
def test_gpu_scope(monkeypatch):
    """Out of scope: =gluon raises naming the rule; auto runs the Triton forward (same result
    as =triton, bit for bit)."""
    skip_unless_hopper()
    monkeypatch.setenv("FLASH_AUTOTUNE", "0")
    cases = [((1, 256, 2, 32), torch.bfloat16, "D in"), ((1, 256, 2, 64), torch.float32, "bf16"),
             ((2, 200, 2, 64), torch.bfloat16, "multiple of 128")]
    for shape, dt, rule in cases:
        q = torch.randn(shape, device="cuda", dtype=dt)
        monkeypatch.setattr(common, "FWD_IMPL", "gluon")
        with pytest.raises(ValueError, match=rule):
            flash_fwd(q, q, q)
        monkeypatch.setattr(common, "FWD_IMPL", "auto")
        o_a, _ = flash_fwd(q, q, q)
        monkeypatch.setattr(common, "FWD_IMPL", "triton")
        o_t, _ = flash_fwd(q, q, q)
        assert torch.equal(o_a, o_t)
