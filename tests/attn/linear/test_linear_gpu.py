"""`linear_attn` on the GPU (pytest -m gpu): the Triton kernels at training sizes against the
float64 recurrence / chunked form, with the rules of scan_testlib.py. (Every autotune config is
run on its own by the lightning GPU tests: the kernels are shared.)"""
import pytest

from gpu_cases import CASES, run_case, run_docs

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("B,T,H,D,dtype", CASES)
def test_gpu_matches_oracle(monkeypatch, B, T, H, D, dtype):
    run_case(monkeypatch, None, B, T, H, D, dtype)


def test_gpu_documents(monkeypatch):
    run_docs(monkeypatch, None)

