"""The background step prefetcher hands out exactly the loader's steps, in order, with the
data position of the last step handed out (not of the prefetched ones), and re-raises errors."""
import pytest
import torch

from data import PackedBatches
from data.prefetch import StepPrefetcher
from data_fixtures import make_stream, rng  # noqa: F401  (pytest fixtures)

SEQ = 16


def _loader(stream):
    return PackedBatches(stream, SEQ, micro_batch=2, grad_accum=2, seed=7)


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for key in ("input_ids", "labels", "positions", "cu_seqlens"):
            assert torch.equal(x[key], y[key]), key


def test_same_steps_and_exact_resume_position(make_stream):
    stream, _ = make_stream(n_docs=60)
    plain, ahead = _loader(stream), _loader(stream)
    pre = StepPrefetcher(ahead, depth=3)
    try:
        for _ in range(5):
            got = pre.next_step()
            _same(got, plain.next_step())
            assert all(mb["n_counted"] == int((mb["labels"] != -100).sum()) for mb in got)
            # the worker is up to 3 steps ahead; the saved position is the consumed one
            assert pre.state_dict() == plain.state_dict()
        resumed = _loader(stream)
        resumed.load_state_dict(pre.state_dict())
        _same(resumed.next_step(), plain.next_step())
    finally:
        pre.close()


def test_prepare_runs_in_the_worker_and_errors_reach_the_loop(make_stream):
    stream, _ = make_stream(n_docs=60)
    seen = []

    def prepare(mb):
        seen.append(1)
        if len(seen) > 4:  # the third step's first micro-batch
            raise RuntimeError("shard failed")
        return dict(mb, input_ids=mb["input_ids"] + 1)

    plain = _loader(stream)
    pre = StepPrefetcher(_loader(stream), prepare, depth=1)
    try:
        for _ in range(2):
            got, ref = pre.next_step(), plain.next_step()
            assert all(torch.equal(g["input_ids"], r["input_ids"] + 1) for g, r in zip(got, ref))
        with pytest.raises(RuntimeError, match="shard failed"):
            pre.next_step()
    finally:
        pre.close()
