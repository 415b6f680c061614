import numpy as np
import pytest
import torch

from data import PackedBatches, val_batches
from data.packing import num_rows
from data_fixtures import make_stream, rng  # noqa: F401  (pytest fixtures)

SEQ = 16


def _sorted_rows(x: torch.Tensor) -> np.ndarray:
    """Rows of a [R, T] tensor in lexicographic order: compares row multisets exactly."""
    a = x.numpy()
    return a[np.lexsort(a.T[::-1])]


def _global_step(stream, mb, ga, dp, seed, n_steps, **kw):
    """For each step, every rank's micro-batches stacked: (input_ids, labels, positions)."""
    loaders = [PackedBatches(stream, SEQ, mb, ga, r, dp, seed=seed, **kw) for r in range(dp)]
    steps = []
    for _ in range(n_steps):
        micro = [b for ld in loaders for b in ld.next_step()]
        assert len(micro) == ga * dp and all(b["input_ids"].shape == (mb, SEQ) for b in micro)
        steps.append({k: torch.cat([b[k] for b in micro]) for k in ("input_ids", "labels", "positions")})
    return steps


def test_same_global_batch_for_every_factorisation(make_stream, fresh_seed):
    stream, _ = make_stream(n_docs=200)
    seed = fresh_seed % 1000
    # (micro_batch, grad_accum, dp_world), all with 4 rows per optimizer step
    layouts = [(2, 2, 1), (2, 1, 2), (4, 1, 1), (1, 2, 2), (1, 4, 1), (1, 1, 4)]
    runs = [_global_step(stream, *layout, seed=seed, n_steps=6) for layout in layouts]
    for run in runs[1:]:
        for step_ref, step in zip(runs[0], run):
            # compare whole (input, label, position) rows as a multiset
            ref = torch.cat([step_ref["input_ids"], step_ref["labels"], step_ref["positions"]], 1)
            got = torch.cat([step["input_ids"], step["labels"], step["positions"]], 1)
            np.testing.assert_array_equal(_sorted_rows(ref), _sorted_rows(got))


def test_ranks_and_micro_steps_split_the_step_rows(make_stream):
    stream, _ = make_stream(n_docs=100)
    mb, ga, dp = 2, 3, 2
    loaders = [PackedBatches(stream, SEQ, mb, ga, r, dp, seed=5) for r in range(dp)]
    rows = loaders[0].step_rows()
    assert len(set(rows.tolist())) == mb * ga * dp
    batches = [ld.next_step() for ld in loaders]
    for r in range(dp):
        for m in range(ga):
            mine = rows[(m * dp + r) * mb:(m * dp + r + 1) * mb]
            expect = np.stack([stream[i * SEQ:i * SEQ + SEQ] for i in mine]).astype(np.int64)
            np.testing.assert_array_equal(batches[r][m]["input_ids"].numpy(), expect)


def test_micro_batch_contents(make_stream):
    stream, _ = make_stream(n_docs=50)
    b = PackedBatches(stream, SEQ, 3, 2, bos_id=0).next_step()
    assert len(b) == 2
    for mb in b:
        assert mb["input_ids"].dtype == mb["labels"].dtype == mb["positions"].dtype == torch.int64
        assert mb["input_ids"].shape == mb["labels"].shape == mb["positions"].shape == (3, SEQ)
        assert mb["cu_seqlens"].dtype == torch.int32
        assert mb["cu_seqlens"][0] == 0 and mb["cu_seqlens"][-1] == 3 * SEQ
    assert PackedBatches(stream, SEQ, 3, 2, document_mask=False).next_step()[0]["cu_seqlens"] is None


def test_epochs_roll_over(make_stream):
    stream, _ = make_stream(n_docs=30, max_len=10)
    seq = 8
    rows = num_rows(len(stream), seq)
    loader = PackedBatches(stream, seq, 2, 1, seed=3)
    per_epoch = rows // 2
    assert loader.steps_per_epoch == per_epoch
    seen = {0: [], 1: []}
    for _ in range(2 * per_epoch):
        loader.next_step()
        state = loader.state_dict()
        g = loader.global_batch
        seen[state["epoch"]].extend(loader._epoch_order(state["epoch"])[(state["step"] - 1) * g:
                                                                        state["step"] * g])
    assert (loader.epoch, loader.step) == (1, per_epoch)
    for epoch_rows in seen.values():  # each epoch visits distinct rows, all but < G of them
        assert len(set(epoch_rows)) == len(epoch_rows) == per_epoch * 2
    assert seen[0] != seen[1]  # a new permutation (equal with probability 1/rows!)

    ordered = PackedBatches(stream, seq, 2, 1, shuffle=False)
    firsts = []
    for _ in range(per_epoch + 1):
        firsts.append(int(ordered.step_rows()[0]))
        ordered.next_step()
    assert firsts == [2 * s for s in range(per_epoch)] + [0]
    assert ordered.state_dict()["epoch"] == 1


@pytest.mark.parametrize("n_before", [7, 5])  # mid-epoch, and exactly at an epoch's end
def test_resume_is_bit_exact(make_stream, n_before):
    stream = make_stream(n_docs=200)[0][:22 * SEQ + 1]  # 22 rows: 5 steps of 4 per epoch
    kw = dict(seq_len=SEQ, micro_batch=2, grad_accum=2, seed=11)
    reference = PackedBatches(stream, **kw)
    assert reference.steps_per_epoch == 5
    expected = [reference.next_step() for _ in range(n_before + 5)]

    first = PackedBatches(stream, **kw)
    for _ in range(n_before):
        first.next_step()
    state = first.state_dict()
    assert all(isinstance(v, (int, bool)) for v in state.values())

    resumed = PackedBatches(stream, **kw)
    resumed.load_state_dict(dict(state))
    for want in expected[n_before:]:
        got = resumed.next_step()
        for w, g in zip(want, got):
            for key in ("input_ids", "labels", "positions", "cu_seqlens"):
                assert torch.equal(w[key], g[key]), key


def test_resume_under_another_factorisation(make_stream):
    stream, _ = make_stream(n_docs=60)
    one = PackedBatches(stream, SEQ, 2, 2, seed=1)
    for _ in range(3):
        one.next_step()
    state = one.state_dict()
    two = [PackedBatches(stream, SEQ, 2, 1, r, 2, seed=1) for r in range(2)]
    for ld in two:
        ld.load_state_dict(state)
    np.testing.assert_array_equal(one.step_rows(), two[0].step_rows())


def test_mismatched_state_is_refused(make_stream):
    stream, _ = make_stream(n_docs=60)
    state = PackedBatches(stream, SEQ, 2, 2).state_dict()
    with pytest.raises(ValueError, match="seq_len"):
        PackedBatches(stream, SEQ * 2, 2, 2).load_state_dict(state)
    with pytest.raises(ValueError, match="global_batch"):
        PackedBatches(stream, SEQ, 2, 1).load_state_dict(state)
    with pytest.raises(ValueError, match="rows"):
        PackedBatches(stream[:len(stream) // 2], SEQ, 2, 2).load_state_dict(state)
    with pytest.warns(UserWarning, match="seed"):
        PackedBatches(stream, SEQ, 2, 2, seed=4).load_state_dict(state)


def test_corpus_smaller_than_a_global_batch():
    stream = np.zeros(5 * SEQ + 1, dtype=np.uint16)
    with pytest.raises(ValueError, match="trainer.micro_batch"):
        PackedBatches(stream, SEQ, 2, 3)
    with pytest.raises(ValueError, match="dp_rank"):
        PackedBatches(stream, SEQ, 1, 1, dp_rank=2, dp_world=2)


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_val_batches_split_over_ranks(make_stream, dp):
    stream, _ = make_stream(n_docs=100)
    single = val_batches(stream, SEQ, 2, 8)
    assert len(single) == 8
    per_rank = [val_batches(stream, SEQ, 2, 8, r, dp) for r in range(dp)]
    assert {len(b) for b in per_rank} == {8 // dp}
    union = torch.cat([b["input_ids"] for batches in per_rank for b in batches])
    ref = torch.cat([b["input_ids"] for b in single])
    np.testing.assert_array_equal(_sorted_rows(union), _sorted_rows(ref))
    # fixed rows in stream order: the single-process set is the first 16 rows
    np.testing.assert_array_equal(ref.numpy(), stream[:16 * SEQ].reshape(16, SEQ))


def test_val_batches_with_too_few_rows(make_stream):
    stream = make_stream(n_docs=100)[0][:5 * SEQ + 1]  # 5 rows: 2 micro-batches of 2
    with pytest.warns(UserWarning, match="val_batches"):
        got = val_batches(stream, SEQ, 2, 8)
    assert len(got) == 2
    with pytest.raises(ValueError, match="validation"):
        val_batches(stream, SEQ, 4, 8, dp_rank=0, dp_world=2)
