"""`lightning_attn` on the GPU (pytest -m gpu): the Triton kernels at training sizes against the
float64 recurrence / chunked form (rules: tests/attn/linear/scan_testlib.py), decays from 0 to
large, documents, every autotune config, and the layer under bf16 autocast."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "linear"))

from gpu_cases import CASES, run_case, run_docs, run_every_config  # noqa: E402
from scan_testlib import rel  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("slopes", ["mixed", "large"])
@pytest.mark.parametrize("B,T,H,D,dtype", CASES)
def test_gpu_matches_oracle(monkeypatch, slopes, B, T, H, D, dtype):
    run_case(monkeypatch, slopes, B, T, H, D, dtype)


def test_gpu_documents(monkeypatch):
    run_docs(monkeypatch, "mixed")


def test_gpu_every_config(monkeypatch):
    run_every_config(monkeypatch, "mixed")


def test_gpu_layer_bf16_autocast(monkeypatch):
    from attn.lightning import LightningCore
    core = LightningCore(1024, 8, 8, layer_idx=2, n_layers=8).cuda()
    x = torch.randn(2, 2048, 1024, device="cuda")
    out = {}
    for impl in ("ref", "triton"):
        monkeypatch.setenv("ATTN_IMPL", impl)
        core.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = core(x, None, None)
        y.float().square().mean().backward()
        out[impl] = (y.float(), [p.grad.float().clone() for p in core.parameters()])
    assert rel(out["triton"][0], out["ref"][0]) < 2e-2
    for a, b in zip(out["triton"][1], out["ref"][1]):
        assert rel(a, b) < 5e-2


