import numpy as np
import pytest

from data.packing import cu_seqlens, find_bos, num_rows, pack, positions
from data_fixtures import make_stream, rng  # noqa: F401  (pytest fixtures)


def _reference_positions(stream, bos):
    """Position of every stream token: distance to the latest bos at or before it (or to 0)."""
    out, start = np.empty(len(stream), dtype=np.int64), 0
    for i, t in enumerate(stream):
        if t == bos:
            start = i
        out[i] = i - start
    return out


def _pack_all(stream, seq_len, bos, document_mask=True):
    rows = np.arange(num_rows(len(stream), seq_len))
    return pack(stream, rows, seq_len, bos, find_bos(stream, bos), document_mask)


def test_num_rows():
    assert num_rows(10, 3) == 3   # rows cover tokens 0..9 with one-token overlap
    assert num_rows(9, 3) == 2
    assert num_rows(4, 3) == 1
    assert num_rows(3, 3) == 0
    with pytest.raises(ValueError, match="seq_len"):
        num_rows(10, 0)


@pytest.mark.parametrize("seq_len", [1, 7, 64, 200])
def test_every_token_once_and_labels_shifted(make_stream, seq_len):
    stream, _ = make_stream(n_docs=40)
    b = _pack_all(stream, seq_len, bos=0)
    n = num_rows(len(stream), seq_len)
    inputs, labels = b["input_ids"], b["labels"]
    assert inputs.shape == labels.shape == (n, seq_len)
    assert inputs.dtype == labels.dtype == np.int64
    rebuilt = np.concatenate([inputs.reshape(-1), labels[-1, -1:]])
    np.testing.assert_array_equal(rebuilt, stream[:n * seq_len + 1])
    np.testing.assert_array_equal(labels[:, :-1], inputs[:, 1:])
    np.testing.assert_array_equal(labels[:-1, -1], inputs[1:, 0])  # row overlap


@pytest.mark.parametrize("seq_len", [5, 64, 300])
def test_positions_restart_at_bos_and_continue_across_rows(make_stream, seq_len):
    stream, starts = make_stream(n_docs=50, bos=3)
    b = _pack_all(stream, seq_len, bos=3)
    n = b["input_ids"].shape[0]
    ref = _reference_positions(stream, 3)[:n * seq_len].reshape(n, seq_len)
    np.testing.assert_array_equal(b["positions"], ref)
    assert b["positions"].dtype == np.int64
    assert np.all(b["positions"][b["input_ids"] == 3] == 0)


def test_hand_checked_example():
    bos = 9
    stream = np.array([9, 1, 2, 9, 3, 4, 9, 5, 6], dtype=np.uint16)
    b = _pack_all(stream, seq_len=4, bos=bos)
    np.testing.assert_array_equal(b["input_ids"], [[9, 1, 2, 9], [3, 4, 9, 5]])
    np.testing.assert_array_equal(b["labels"], [[1, 2, 9, 3], [4, 9, 5, 6]])
    # row 1 starts inside the document that began at stream index 3
    np.testing.assert_array_equal(b["positions"], [[0, 1, 2, 0], [1, 2, 0, 1]])
    np.testing.assert_array_equal(b["cu_seqlens"], [0, 3, 4, 6, 8])
    assert b["cu_seqlens"].dtype == np.int32


def test_stream_without_leading_bos_counts_from_stream_start():
    stream = np.array([5, 6, 7, 8, 0, 1, 2, 3, 4], dtype=np.uint16)
    b = _pack_all(stream, seq_len=4, bos=0)
    np.testing.assert_array_equal(b["positions"], [[0, 1, 2, 3], [0, 1, 2, 3]])
    np.testing.assert_array_equal(b["cu_seqlens"], [0, 4, 8])


@pytest.mark.parametrize("seq_len", [3, 32, 257])
def test_cu_seqlens_agree_with_positions(make_stream, rng, seq_len):
    stream, _ = make_stream(n_docs=30, bos=0)
    n = num_rows(len(stream), seq_len)
    rows = rng.permutation(n)[:4]  # an arbitrary micro-batch of rows
    b = pack(stream, rows, seq_len, 0, find_bos(stream, 0))
    cu, pos = b["cu_seqlens"], b["positions"].reshape(-1)
    total = len(rows) * seq_len
    assert cu[0] == 0 and cu[-1] == total and np.all(np.diff(cu) > 0)
    # a segment starts exactly at row starts and bos tokens ...
    is_start = np.zeros(total, dtype=bool)
    is_start[cu[:-1]] = True
    expected = (b["input_ids"].reshape(-1) == 0) | (np.arange(total) % seq_len == 0)
    np.testing.assert_array_equal(is_start, expected)
    # ... and inside a segment positions count up by one
    inner = ~is_start[1:]
    np.testing.assert_array_equal(np.diff(pos)[inner], 1)
    assert np.all(pos[is_start & (b["input_ids"].reshape(-1) == 0)] == 0)


def test_cu_seqlens_on_2d_and_document_mask_off(make_stream):
    stream, _ = make_stream(n_docs=10)
    assert _pack_all(stream, 8, 0, document_mask=False)["cu_seqlens"] is None
    np.testing.assert_array_equal(cu_seqlens(np.array([[1, 2], [3, 4]]), bos_id=0), [0, 2, 4])
    np.testing.assert_array_equal(positions(np.array([1, 0, 2]), 0, np.array([7])), [[7, 0, 1]])
