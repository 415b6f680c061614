"""Fixtures for the data/ tests: a numpy generator seeded from the session-wide fresh seed
(tests/conftest.py prints it for replay), random packed streams, and isolated caches.

Not a conftest.py: other test modules do `from conftest import ...`, and a second conftest.py
here would take that module name over. Test modules import the fixtures they use from here.
"""
import numpy as np
import pytest


@pytest.fixture
def rng(fresh_seed):
    return np.random.default_rng(fresh_seed)


@pytest.fixture
def make_stream(rng):
    """make_stream(n_docs, bos=..., vocab=..., max_len=...) -> (uint16 stream, doc_starts).

    Document lengths vary from 1 token to several rows so that rows start mid-document, hold
    several documents, or lie inside one document."""
    def make(n_docs: int = 60, bos: int = 0, vocab: int = 1000, max_len: int = 80):
        parts, starts, n = [], [], 0
        for _ in range(n_docs):
            length = int(rng.integers(1, max_len + 1))
            doc = rng.integers(0, vocab, size=length)
            doc[doc == bos] = bos + 1  # the separator never occurs inside a document
            starts.append(n)
            parts.append(np.concatenate([[bos], doc]))
            n += 1 + length
        return np.concatenate(parts).astype(np.uint16), np.asarray(starts)
    return make


@pytest.fixture
def cache_dir(tmp_path):
    return str(tmp_path / "token_cache")


@pytest.fixture
def hf_offline(tmp_path, monkeypatch):
    """Keep `datasets` away from the network and from the user's ~/.cache."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    return tmp_path
