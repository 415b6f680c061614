"""GPU cases shared by tests/attn/linear/test_linear_gpu.py and the lightning GPU tests
(`slopes=None`: the linear family). Sizes: T up to 16k, D = 128, bf16, plus fp32 long runs, odd
lengths, documents, every head dim, and every autotune config run on its own."""
from __future__ import annotations

import pytest
import torch

from attn.linear import launch
from scan_testlib import check_case, random_docs

CASES = [  # (B, T, H, D, dtype)
    (2, 4096, 4, 128, torch.bfloat16),
    (1, 16384, 2, 128, torch.bfloat16),
    (1, 3000, 2, 64, torch.float16),
    (1, 8192, 2, 128, torch.float32),   # no drift over 8k tokens in fp32 (ieee products)
    (3, 1, 2, 128, torch.bfloat16),     # T = 1
    (1, 1100, 1, 256, torch.bfloat16),
    (2, 700, 2, 32, torch.float32),
    (1, 333, 3, 16, torch.bfloat16),
]


def run_case(monkeypatch, slopes, B, T, H, D, dtype):
    errs = check_case(monkeypatch, slopes=slopes, B=B, T=T, H=H, D=D, dtype=dtype,
                      device="cuda", oracle="chunked" if T > 2048 else "recurrent")
    print(f"T={T} D={D} {dtype}: {errs}")


def run_docs(monkeypatch, slopes):
    cu = random_docs(10000, 20).tolist()
    errs = check_case(monkeypatch, slopes=slopes, T=10000, H=2, D=128, dtype=torch.bfloat16,
                      cu=cu, device="cuda", oracle="chunked")
    print(f"documents {cu}: {errs}")


def run_every_config(monkeypatch, slopes):
    """Each autotune candidate alone (LINEAR_AUTOTUNE=0 runs the first entry of each table)."""
    monkeypatch.setenv("LINEAR_AUTOTUNE", "0")
    outs, states = list(launch._OUT_CFGS), list(launch._STATE_CFGS)
    for i in range(max(len(outs), len(states))):
        monkeypatch.setattr(launch, "_OUT_CFGS", [outs[i % len(outs)]])
        monkeypatch.setattr(launch, "_STATE_CFGS", [states[i % len(states)]])
        try:
            check_case(monkeypatch, slopes=slopes, B=1, T=2085, H=2, D=128,
                       dtype=torch.bfloat16, device="cuda", oracle="chunked")
        except AssertionError as e:
            pytest.fail(f"config out={outs[i % len(outs)]} state={states[i % len(states)]}: {e}")
