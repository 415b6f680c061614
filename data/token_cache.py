"""Tokenize a document source once and keep the result on disk.

A corpus becomes one flat array of token ids, every document preceded by the tokenizer's
`bos_id`, plus the offsets of those separators (`doc_starts`). Both are .npy files in
`<cache_dir>/<label>-<key>/`, where `key` hashes everything that determines the content
(source description, tokenizer, caps, split). Later runs memory-map them instead of
re-tokenizing.

Concurrency: several ranks (or jobs) may build the same entry at once. Every file is written
to a private temp file and moved into place with os.replace (atomic on POSIX), and meta.json,
written last, is what marks an entry complete. Builders are deterministic, so racing writers
produce identical files and whichever rename lands last is as good as the first.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np

log = logging.getLogger(__name__)

# bump when the on-disk layout or the tokenization rules below change
FORMAT_VERSION = 1


@dataclass
class TokenizedCorpus:
    tokens: np.ndarray      # flat uint16/uint32 stream, [bos] + doc tokens, doc after doc
    doc_starts: np.ndarray  # int64 offset of each document's bos in `tokens`
    meta: dict              # what was cached (description, counts, dtype)
    path: str               # the cache entry's directory


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every id (halves the cache for vocabs up to 64K)."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def cache_key(description: dict) -> str:
    """Stable hash of a JSON-serialisable description (key order does not matter)."""
    blob = json.dumps(description, sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:20]


def _batched(items: Iterable[str], n: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _encode_batch(tokenizer, texts: list[str]) -> list[list[int]]:
    if hasattr(tokenizer, "encode_batch"):
        return tokenizer.encode_batch(texts)
    return [tokenizer.encode(t) for t in texts]


def tokenize_documents(documents: Iterable[str], tokenizer,
                       batch_docs: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(flat token stream, doc_starts) for the given documents; empty documents are skipped."""
    dtype = token_dtype(tokenizer.vocab_size)
    bos = int(tokenizer.bos_id)
    chunks: list[np.ndarray] = []
    starts: list[int] = []
    n = 0
    for texts in _batched(documents, batch_docs):
        for ids in _encode_batch(tokenizer, texts):
            arr = np.asarray(ids, dtype=np.int64)
            # The separator must mean "a document starts here" and nothing else: packing finds
            # documents by it. A tokenizer whose bos/eos can also come out of plain text
            # (e.g. "<|endoftext|>" inside a web page) would otherwise split a document.
            arr = arr[arr != bos]
            if arr.size == 0:
                continue
            starts.append(n)
            chunks.append(np.array([bos], dtype=dtype))
            chunks.append(arr.astype(dtype))
            n += 1 + arr.size
    tokens = np.concatenate(chunks) if chunks else np.zeros(0, dtype=dtype)
    return tokens, np.asarray(starts, dtype=np.int64)


def _atomic_write(path: str, write: Callable) -> None:
    """Write through `write(file)` into a temp file beside `path`, then rename it into place."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; a shared cache should be readable
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _try_load(entry: str) -> TokenizedCorpus | None:
    meta_path = os.path.join(entry, "meta.json")
    if not os.path.exists(meta_path):
        return None
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        tokens = np.load(os.path.join(entry, "tokens.npy"), mmap_mode="r")
        doc_starts = np.load(os.path.join(entry, "doc_starts.npy"))
    except (OSError, ValueError) as e:  # half-deleted or foreign files: rebuild
        log.warning("ignoring unreadable token cache %s (%s)", entry, e)
        return None
    if meta.get("n_tokens") != len(tokens) or meta.get("n_docs") != len(doc_starts):
        log.warning("ignoring inconsistent token cache %s", entry)
        return None
    return TokenizedCorpus(tokens, doc_starts, meta, entry)


def load_or_build(cache_dir: str, label: str, description: dict, tokenizer,
                  documents: Callable[[], Iterable[str]], source: str | None = None) -> TokenizedCorpus:
    """The cached corpus for `description`, tokenizing `documents()` only on a cache miss.

    `description` must name everything the documents depend on (source, split, caps, file
    identities); the tokenizer's name, vocab size and bos id are added to it here.
    `label` only makes the directory name readable (e.g. "builtin-train"); `source` names
    where the documents come from in messages (e.g. "data.path='corpus/'").
    """
    full = dict(description, tokenizer=tokenizer.name, vocab_size=int(tokenizer.vocab_size),
                bos_id=int(tokenizer.bos_id), format_version=FORMAT_VERSION)
    entry = os.path.join(os.path.expanduser(cache_dir), f"{label}-{cache_key(full)}")
    cached = _try_load(entry)
    if cached is not None:
        log.info("loaded tokenized %s from %s (%d tokens)", label, entry, len(cached.tokens))
        return cached

    tokens, doc_starts = tokenize_documents(documents(), tokenizer)
    if len(doc_starts) == 0:
        where = source or f"data.source={description.get('source', '?')}"
        raise ValueError(f"{where} holds no text for the {label} corpus: no non-empty document")
    os.makedirs(entry, exist_ok=True)
    meta = {"description": full, "n_tokens": int(len(tokens)), "n_docs": int(len(doc_starts)),
            "dtype": str(tokens.dtype)}
    _atomic_write(os.path.join(entry, "tokens.npy"), lambda f: np.save(f, tokens))
    _atomic_write(os.path.join(entry, "doc_starts.npy"), lambda f: np.save(f, doc_starts))
    # last: its presence is what makes the entry count as complete
    _atomic_write(os.path.join(entry, "meta.json"),
                  lambda f: f.write(json.dumps(meta, indent=1, sort_keys=True).encode("utf-8")))
    log.info("tokenized %s: %d documents, %d tokens -> %s", label, len(doc_starts), len(tokens), entry)
    # hand back the memory-mapped file, exactly what a later cache hit would return
    return _try_load(entry) or TokenizedCorpus(tokens, doc_starts, meta, entry)
