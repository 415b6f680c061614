import os
import threading

import numpy as np
import pytest

from data import ByteTokenizer, build_data, builtin_corpus
from data.builtin import EXCLUDED_DIRS, list_stdlib_files, select_files, stdlib_root
from data.token_cache import load_or_build
from data_fixtures import cache_dir  # noqa: F401  (pytest fixture)

SMALL = 150_000  # bytes of train text: fast to tokenize, still dozens of files


def _cfg(cache_dir, **over):
    cfg = {"source": "builtin", "tokenizer": "bytes", "max_bytes": SMALL, "val_percent": 5,
           "val_batches": 4, "shuffle": True, "document_mask": True, "cache_dir": cache_dir}
    cfg.update(over)
    return cfg


def test_file_selection_disjoint_nonempty_and_capped():
    files = list_stdlib_files()
    paths = [p for p, _ in files]
    assert paths == sorted(paths) and len(paths) > 100
    assert not any(set(p.split("/")[:-1]) & EXCLUDED_DIRS for p in paths)
    train = select_files("train", SMALL)
    val = select_files("validation", SMALL)
    assert train and val
    assert not {p for p, _ in train} & {p for p, _ in val}
    for chosen, cap in ((train, SMALL), (val, SMALL // 10)):
        sizes = [s for _, s in chosen]
        assert sum(sizes[:-1]) < cap  # stopped right after crossing the budget
    # the full validation split is roughly val_percent of the files
    full_val = select_files("validation", 10**12, val_percent=5)
    assert 0.01 < len(full_val) / len(files) < 0.12


def test_corpus_is_deterministic_and_starts_documents_with_bos(tmp_path):
    tok = ByteTokenizer()
    a = builtin_corpus("train", tok, str(tmp_path / "a"), max_bytes=SMALL)
    b = builtin_corpus("train", tok, str(tmp_path / "b"), max_bytes=SMALL)  # tokenized anew
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.doc_starts, b.doc_starts)
    assert a.tokens.dtype == np.uint16
    np.testing.assert_array_equal(np.flatnonzero(np.asarray(a.tokens) == 256), a.doc_starts)
    # the first document is the first selected file, byte for byte
    rel = select_files("train", SMALL)[0][0]
    with open(os.path.join(stdlib_root(), rel), "rb") as f:
        first = f.read()
    end = a.doc_starts[1] if len(a.doc_starts) > 1 else len(a.tokens)
    assert bytes(np.asarray(a.tokens[1:end]).astype(np.uint8)) == first


def test_cache_is_reused_without_tokenizing(cache_dir, monkeypatch):
    tok = ByteTokenizer()
    built = builtin_corpus("validation", tok, cache_dir, max_bytes=SMALL)

    def refuse(self, text):
        raise AssertionError("tokenized again despite the cache")

    monkeypatch.setattr(ByteTokenizer, "encode", refuse)
    cached = builtin_corpus("validation", tok, cache_dir, max_bytes=SMALL)
    assert isinstance(cached.tokens, np.memmap)
    np.testing.assert_array_equal(built.tokens, cached.tokens)
    # a different cap is a different entry: it must tokenize (and here, fail)
    with pytest.raises(AssertionError, match="tokenized again"):
        builtin_corpus("validation", tok, cache_dir, max_bytes=SMALL * 2)


def test_concurrent_builders_are_safe(cache_dir):
    tok = ByteTokenizer()
    docs = [f"document {i} " * (i + 1) for i in range(200)]
    results, errors = [], []

    def build():
        try:
            results.append(load_or_build(cache_dir, "race", {"n": 200}, tok, lambda: iter(docs)))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for r in results[1:]:
        np.testing.assert_array_equal(results[0].tokens, r.tokens)
    (entry,) = os.listdir(cache_dir)
    assert sorted(os.listdir(os.path.join(cache_dir, entry))) == ["doc_starts.npy", "meta.json", "tokens.npy"]


def test_build_data_builtin(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    tok, train, val = build_data(_cfg("~/cache"), seq_len=64, micro_batch=2, grad_accum=2,
                                 dp_rank=1, dp_world=2, seed=3)
    assert tok.name == "bytes" and os.path.isdir(tmp_path / "cache")  # ~ expanded
    step = train.next_step()
    assert len(step) == 2 and step[0]["input_ids"].shape == (2, 64)
    assert len(val) == 2  # 4 validation micro-batches over 2 ranks
    assert int(step[0]["input_ids"].max()) < tok.vocab_size


def test_build_data_rejects_unknown_source_and_warns_on_unknown_keys(cache_dir):
    with pytest.raises(ValueError, match="builtin.*hf"):
        build_data(_cfg(cache_dir, source="web"), 64, 1, 1)
    with pytest.warns(UserWarning, match="max_byte"):
        build_data(_cfg(cache_dir, max_byte=10), 64, 1, 1)


def test_build_data_from_omegaconf(cache_dir):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(_cfg(cache_dir, document_mask=False, shuffle=False))
    _, train, val = build_data(cfg, 32, 2, 1)
    assert train.next_step()[0]["cu_seqlens"] is None and val[0]["cu_seqlens"] is None
    assert train.step_rows()[0] == 2  # unshuffled: rows in order


def test_configs_data_builtin_yaml(cache_dir):
    yaml = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "data", "builtin.yaml")
    if not os.path.exists(yaml):
        pytest.skip("configs/data/builtin.yaml not present")
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(yaml)
    cfg.merge_with({"max_bytes": SMALL, "cache_dir": cache_dir})
    tok, train, val = build_data(cfg, seq_len=64, micro_batch=1, grad_accum=1)
    assert tok.vocab_size == 257 and len(val) == 8 and train.steps_per_epoch > 0
