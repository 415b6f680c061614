"""The embedded corpus: the Python standard library's own source code.

Every Python installation carries ~10 MB of real, varied text (code, docstrings, comments),
so the default CPU run trains on something meaningful with no download. Files are taken in
sorted order of their relative path, split into train/validation by a stable hash of that
path, and capped by size so tokenizing stays quick.

The corpus depends on the Python version (the stdlib changes); the cache key includes the
selected files' names and sizes, so a different interpreter gets its own cache entry.
"""
from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
import zlib
from typing import Iterator

from data.token_cache import TokenizedCorpus, load_or_build

# vendored packages, the stdlib's own test suite (huge and repetitive) and legacy tooling
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib",
                           "lib2to3", "__pycache__"})
SPLITS = ("train", "validation")


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def list_stdlib_files(root: str | None = None) -> list[tuple[str, int]]:
    """(relative posix path, size in bytes) of every eligible .py file, sorted by path."""
    root = root or stdlib_root()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]
        for fname in filenames:
            if fname.endswith(".py"):
                full = os.path.join(dirpath, fname)
                rel = os.path.relpath(full, root).replace(os.sep, "/")
                found.append((rel, os.path.getsize(full)))
    found.sort()
    return found


def is_validation(relpath: str, val_percent: int) -> bool:
    """Stable across runs and machines (crc32, unlike hash(), is not salted per process)."""
    return zlib.crc32(relpath.encode("utf-8")) % 100 < val_percent


def split_cap(split: str, max_bytes: int) -> int:
    """Byte budget of a split: validation gets a tenth of train's."""
    return max_bytes if split == "train" else max(max_bytes // 10, 1)


def select_files(split: str, max_bytes: int, val_percent: int = 5,
                 root: str | None = None) -> list[tuple[str, int]]:
    """The files of `split`, in path order, until the split's byte budget is used up.

    The file that crosses the budget is still included (so a tiny budget yields one file).
    """
    if split not in SPLITS:
        raise ValueError(f"builtin corpus split must be one of {SPLITS}, got {split!r}")
    if not 0 < val_percent < 100:
        raise ValueError(f"data.val_percent must be in 1..99, got {val_percent}")
    if max_bytes <= 0:
        raise ValueError(f"data.max_bytes must be positive, got {max_bytes}")
    want_val = split == "validation"
    cap = split_cap(split, max_bytes)
    chosen, total = [], 0
    for rel, size in list_stdlib_files(root):
        if is_validation(rel, val_percent) != want_val:
            continue
        if total >= cap:
            break
        chosen.append((rel, size))
        total += size
    return chosen


def read_documents(files: list[tuple[str, int]], root: str | None = None) -> Iterator[str]:
    root = root or stdlib_root()
    for rel, _ in files:
        with open(os.path.join(root, rel), encoding="utf-8", errors="replace") as f:
            yield f.read()


def builtin_corpus(split: str, tokenizer, cache_dir: str, max_bytes: int = 4_000_000,
                   val_percent: int = 5) -> TokenizedCorpus:
    """Tokenized (and cached) stdlib corpus for `split` ("train" or "validation")."""
    root = stdlib_root()
    files = select_files(split, max_bytes, val_percent, root)
    if not files:
        raise ValueError(f"data: the builtin {split} split is empty (stdlib at {root}, "
                         f"val_percent={val_percent})")
    digest = hashlib.sha256("\n".join(f"{rel}:{size}" for rel, size in files).encode()).hexdigest()
    description = {
        "source": "builtin", "split": split, "max_bytes": int(max_bytes),
        "val_percent": int(val_percent), "python": sys.version.split()[0],
        "n_files": len(files), "files_digest": digest,
    }
    return load_or_build(cache_dir, f"builtin-{split}", description, tokenizer,
                         lambda: read_documents(files, root))
