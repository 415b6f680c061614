"""Synthetic recall tasks (data/synthetic.py): the generators put what they say where they say,
and the batches are the same stream under any split over ranks and micro-batches."""
import numpy as np
import pytest
import torch

from data.synthetic import IGNORE, MQAR, Passkey, SyntheticBatches
from data.tokenizer import ByteTokenizer

HAY = np.frombuffer(b"".join(b"line %d of some haystack text\n" % i for i in range(400)),
                    dtype=np.uint8).astype(np.int64)


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("T", [160, 777])
def test_passkey_needle_is_where_it_says(depth, T):
    tok = ByteTokenizer()
    task = Passkey.build(tok, HAY, digits=5)
    ids, labels, where = task.sample(np.random.default_rng(int(depth * 10) + T), T, depth)
    assert ids.shape == labels.shape == (T,)
    text = tok.decode(ids)
    room = T - task.overhead()
    start = text.index(" The pass key is ")
    assert start == round(depth * room)  # the needle starts depth x haystack into the row
    key = text[start + 17:start + 22]
    assert key.isdigit() and key[0] != "0"
    assert text[start + 22:].startswith(f". Remember it. {key} is the pass key. ")
    assert text.endswith(f" What is the pass key? The pass key is {key}")
    # labels: only the digits, each at the position before it
    assert (labels != IGNORE).sum() == 5 and list(where) == list(range(T - 6, T - 1))
    assert tok.decode(labels[where]) == key and list(ids[where + 1]) == list(labels[where])


def test_passkey_refuses_rows_too_short():
    task = Passkey.build(ByteTokenizer(), HAY)
    with pytest.raises(ValueError, match="leaves no room for the haystack"):
        task.sample(np.random.default_rng(0), task.overhead())


@pytest.mark.parametrize("n_pairs,T", [(4, 64), (8, 64), (3, 33)])
def test_mqar_labels_are_the_stored_values(n_pairs, T):
    task = MQAR(n_pairs=8, n_keys=16, n_values=16)
    ids, labels = task.sample(np.random.default_rng(T), T, n_pairs)
    keys, values = ids[0:2 * n_pairs:2], ids[1:2 * n_pairs:2]
    assert len(set(keys)) == n_pairs and len(set(values)) == n_pairs
    assert keys.max() < 16 <= values.min() and values.max() < 32
    store = dict(zip(keys, values))
    scored = np.flatnonzero(labels != IGNORE)
    assert len(scored) >= n_pairs and scored.min() == 2 * n_pairs  # none inside the store
    assert all(labels[t] == store[ids[t]] for t in scored)
    assert {ids[t] for t in scored[:n_pairs]} == set(keys)  # every pair queried first


def test_mqar_settings_are_checked():
    with pytest.raises(ValueError, match=r"data.n_pairs=20 must be <= data.n_keys=16"):
        MQAR(n_pairs=20, n_keys=16, n_values=64).check(257, 128)
    with pytest.raises(ValueError, match=r"beyond the tokenizer's vocabulary of 257"):
        MQAR(n_keys=200, n_values=100).check(257, 128)
    with pytest.raises(ValueError, match=r"trainer.seq_len=10 is too short"):
        MQAR(n_pairs=8).check(257, 10)


def test_batches_do_not_depend_on_the_split_and_resume():
    task = MQAR(n_pairs=4, n_keys=16, n_values=16)
    one = SyntheticBatches(task, 32, micro_batch=4, grad_accum=1, seed=3)
    ranks = [SyntheticBatches(task, 32, micro_batch=1, grad_accum=2, dp_rank=r, dp_world=2,
                              seed=3) for r in range(2)]
    for _ in range(2):
        whole = one.next_step()[0]["input_ids"]
        parts = [r.next_step() for r in ranks]
        # micro step m of rank r holds global rows (m * world + r) * micro_batch ...
        order = [parts[0][0], parts[1][0], parts[0][1], parts[1][1]]
        assert torch.equal(whole, torch.cat([p["input_ids"] for p in order]))
    again = SyntheticBatches(task, 32, micro_batch=4, grad_accum=1, seed=99)
    again.load_state_dict(one.state_dict())
    assert torch.equal(again.next_step()[0]["labels"], one.next_step()[0]["labels"])
    val = one.validation(2)
    assert len(val) == 2 and not torch.equal(val[0]["input_ids"], whole[:4])


def test_mqar_rows_draw_their_pair_count_from_the_list():
    task = MQAR(n_pairs=(2, 5, 8), n_keys=16, n_values=16)
    task.check(257, 64)
    seen = set()
    for seed in range(60):
        ids, labels = task.sample(np.random.default_rng(seed), 64)
        n = int(np.flatnonzero(labels != IGNORE).min()) // 2  # queries start after 2n tokens
        seen.add(n)
        store = dict(zip(ids[0:2 * n:2], ids[1:2 * n:2]))
        scored = np.flatnonzero(labels != IGNORE)
        assert len(store) == n and all(labels[t] == store[ids[t]] for t in scored)
    assert seen == {2, 5, 8}
    with pytest.raises(ValueError, match=r"data.seq_len|too short for data.n_pairs=\(2, 40\)"):
        MQAR(n_pairs=(2, 40), n_keys=64, n_values=64).check(257, 64)
    with pytest.raises(ValueError, match=r"an integer or a list"):
        MQAR(n_pairs=(), n_keys=16, n_values=16).check(257, 64)


def test_recall_mixture_has_both_tasks_at_its_share():
    from data import synthetic_task
    cfg = {"source": "recall", "n_pairs": [4, 8], "n_keys": 16, "n_values": 16,
           "passkey_share": 0.25, "max_bytes": 200_000}
    task = synthetic_task(cfg, ByteTokenizer(), 256)
    mq = MQAR(n_pairs=8, n_keys=16, n_values=16)
    kinds = []
    for seed in range(400):
        ids, labels, _ = task.row(np.random.default_rng(seed), 256)
        scored = np.flatnonzero(labels != IGNORE)
        passkey = len(scored) == 5 and list(scored) == list(range(250, 255))
        assert passkey or (ids[scored] < mq.n_keys).all()  # an MQAR row scores at its keys
        kinds.append(passkey)
    assert 0.18 < np.mean(kinds) < 0.32  # 400 rows at p = 0.25: sd 0.022
    for bad in (0, 1, "half", True):
        with pytest.raises(ValueError, match="data.passkey_share"):
            synthetic_task({**cfg, "passkey_share": bad}, ByteTokenizer(), 256)


def test_packed_mqar_rows_are_instances_with_their_own_documents():
    task = MQAR(n_pairs=(2, 4), n_keys=16, n_values=16, min_len=20)
    task.check(257, 256)
    batches = SyntheticBatches(task, 256, micro_batch=3, grad_accum=1, seed=5)
    mb = batches.next_step()[0]
    ids, labels, pos, cu = (mb[k].numpy()
                            for k in ("input_ids", "labels", "positions", "cu_seqlens"))
    assert cu.dtype == np.int32 and cu[0] == 0 and cu[-1] == 3 * 256 and (np.diff(cu) >= 20).all()
    assert len(cu) > 4  # several instances per row on average (log-uniform lengths in [20, 256])
    flat_ids, flat_labels, flat_pos = ids.reshape(-1), labels.reshape(-1), pos.reshape(-1)
    for a, b in zip(cu[:-1], cu[1:]):
        assert a // 256 == (b - 1) // 256  # no document crosses a row
        assert list(flat_pos[a:b]) == list(range(b - a))  # positions restart per document
        doc, lab = flat_ids[a:b], flat_labels[a:b]
        scored = np.flatnonzero(lab != IGNORE)
        n = scored.min() // 2  # the instance's pair count: its store is the first 2n tokens
        assert n in (2, 4)
        store = dict(zip(doc[0:2 * n:2], doc[1:2 * n:2]))
        assert all(lab[t] == store[doc[t]] for t in scored)  # answers come from its own store
    with pytest.raises(ValueError, match=r"data.min_len=9 must be 0 .* \[10, 256\]"):
        MQAR(n_pairs=4, min_len=9).check(257, 256)
    one = SyntheticBatches(MQAR(n_pairs=4), 64, micro_batch=2, grad_accum=1).next_step()[0]
    assert one["cu_seqlens"] is None and (one["positions"][1] == torch.arange(64)).all()
