"""Hugging Face `datasets` as a document source: hub datasets, local dataset directories, or
local text/json/parquet files.

Each document is the string in `text_field` of one row (for the `text` builder: one whole
file, not one line, so that a document separator marks a real document boundary). Without a
validation split, a deterministic `val_fraction` of the train documents is carved off by a
hash of their content, which works the same streamed or not and keeps exact duplicates on
one side.

The cache key is computed from the configuration (plus name, size and mtime of local files)
without opening the dataset, so a cached hub dataset loads with no network.
"""
from __future__ import annotations

import codecs
import glob
import logging
import os
import zlib
from typing import Iterable, Iterator

from data.token_cache import TokenizedCorpus, load_or_build

log = logging.getLogger(__name__)

BUILDERS = ("text", "json", "parquet")
ROLES = ("train", "validation")
# local files that are binary by design (columnar or compressed): never blamed for bad UTF-8
_BINARY_SUFFIXES = (".parquet", ".arrow", ".gz", ".bz2", ".xz", ".zst", ".zip", ".lz4", ".tar")


def _is_remote(pattern: str) -> bool:
    return "://" in pattern


def _looks_local(path: str) -> bool:
    # a hub id is "name" or "owner/name"; these prefixes can only mean the filesystem
    return path.startswith(("/", "./", "../", "~")) or os.path.exists(os.path.expanduser(path))


def _file_identity(path: str) -> list:
    st = os.stat(path)
    return [os.path.abspath(path), st.st_size, int(st.st_mtime_ns)]


def _resolve_patterns(patterns: str | Iterable[str]) -> list[str]:
    """Expand ~ and globs of local data files into a sorted explicit list (remote URLs pass)."""
    if isinstance(patterns, str):
        patterns = [patterns]
    files: list[str] = []
    for pattern in patterns:
        pattern = str(pattern)
        if _is_remote(pattern):
            files.append(pattern)
            continue
        pattern = os.path.expanduser(pattern)
        matched = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else (
            [pattern] if os.path.exists(pattern) else [])
        matched = [m for m in matched if os.path.isfile(m)]
        if not matched:
            raise ValueError(f"data.data_files: {pattern!r} matches no file")
        files.extend(matched)
    return files


def resolve_data_files(data_files) -> list[str] | dict[str, list[str]]:
    """A str / list of patterns, or a mapping split -> patterns (as `datasets` accepts)."""
    if hasattr(data_files, "items"):
        return {str(split): _resolve_patterns(p) for split, p in data_files.items()}
    return _resolve_patterns(data_files)


def _identity(files: list[str] | dict[str, list[str]]):
    """What the cache key records of local files: path, size, mtime (so edits invalidate)."""
    if isinstance(files, dict):
        return {s: _identity(f) for s, f in files.items()}
    return [f if _is_remote(f) else _file_identity(f) for f in files]


def _dir_identity(root: str) -> list:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(_file_identity(os.path.join(dirpath, f)) for f in sorted(filenames)
                   if not f.startswith("."))
    return out


def _not_utf8(path: str) -> str | None:
    """Where the file at `path` stops being UTF-8 ("byte 0x80 at offset 5"), or None."""
    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 20)
            start = offset - len(decoder.getstate()[0])  # file offset of the decoder's input
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as err:
                bad = err.object[err.start:err.start + 1]
                return f"byte 0x{bad.hex() or '??'} at offset {start + err.start}"
            if not chunk:
                return None
            offset += len(chunk)


def is_carved_validation(text: str, val_fraction: float) -> bool:
    return zlib.crc32(text.encode("utf-8", errors="replace")) < val_fraction * 2**32


class HFSource:
    """A configured HF dataset; `documents(role)` yields the train or validation texts."""

    def __init__(self, path: str | None = None, name: str | None = None, data_files=None,
                 builder: str | None = None, split: str = "train",
                 val_split: str | None = "validation", val_fraction: float = 0.01,
                 text_field: str = "text", streaming: bool = False, max_docs: int | None = None):
        if builder is not None:
            if builder not in BUILDERS:
                raise ValueError(f"data.builder must be one of {BUILDERS} (or null to load "
                                 f"data.path), got {builder!r}")
            if data_files is None:
                raise ValueError(f"data.builder={builder!r} needs data.data_files (a file, glob or list)")
            if path is not None:
                raise ValueError("set either data.path (hub name or dataset directory) or "
                                 "data.builder + data.data_files, not both")
            self.files = resolve_data_files(data_files)
        else:
            if path is None:
                raise ValueError("data.path is required: a hub dataset name or a local dataset "
                                 "directory (or set data.builder and data.data_files)")
            path = str(path)
            if _looks_local(path) and not os.path.isdir(os.path.expanduser(path)):
                raise ValueError(f"data.path={path!r} is not an existing directory")
            self.files = resolve_data_files(data_files) if data_files is not None else None
        if not 0.0 <= float(val_fraction) < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        if max_docs is not None and int(max_docs) <= 0:
            raise ValueError(f"data.max_docs must be positive or null, got {max_docs}")
        self.path = os.path.expanduser(path) if path is not None and _looks_local(path) else path
        self.name, self.builder, self.split, self.val_split = name, builder, split, val_split
        self.val_fraction, self.text_field = float(val_fraction), text_field
        self.streaming, self.max_docs = bool(streaming), (None if max_docs is None else int(max_docs))
        # how messages name the source
        self.where = (f"data.path={self.path!r}" if builder is None
                      else f"data.data_files={self.files!r}")

    def description(self, role: str) -> dict:
        """Everything the documents of `role` depend on, for the cache key (no dataset I/O)."""
        if self.files is not None:
            files = _identity(self.files)
        elif self.path is not None and os.path.isdir(self.path):
            files = _dir_identity(self.path)
        else:
            files = None  # hub dataset: identified by its name (the revision is not tracked)
        return {"source": "hf", "role": role, "path": self.path, "name": self.name,
                "builder": self.builder, "files": files, "split": self.split,
                "val_split": self.val_split, "val_fraction": self.val_fraction,
                "text_field": self.text_field, "max_docs": self.max_docs}

    def _load(self):
        import datasets  # heavy import: only when a corpus is actually (re)built

        if self.builder is not None:
            extra = {"sample_by": "document"} if self.builder == "text" else {}
            return datasets.load_dataset(self.builder, data_files=self.files,
                                         streaming=self.streaming, **extra)
        kwargs = {"data_files": self.files} if self.files is not None else {}
        return datasets.load_dataset(self.path, self.name, streaming=self.streaming, **kwargs)

    def _texts(self, ds, where: str) -> Iterator[str]:
        """The first `max_docs` rows' texts (rows with a null text are skipped)."""
        field = self.text_field
        columns = ds.column_names  # None for a streamed dataset of unknown features
        if columns is not None:
            if field not in columns:
                raise ValueError(f"data.text_field={field!r} is not a column of {where}; "
                                 f"columns: {list(columns)}")
            ds = ds.select_columns([field])
        n = 0
        for batch in ds.iter(batch_size=1000):
            if field not in batch:
                raise ValueError(f"data.text_field={field!r} is not a column of {where}; "
                                 f"columns: {list(batch)}")
            for text in batch[field]:
                if self.max_docs is not None and n >= self.max_docs:
                    return
                n += 1
                if text is None:
                    continue
                if not isinstance(text, str):
                    raise ValueError(f"data.text_field={field!r} of {where} must hold strings, "
                                     f"got {type(text).__name__}")
                yield text

    def _local_files(self) -> list[str]:
        files = self.files
        if files is None:
            root = self.path if self.path is not None and os.path.isdir(self.path) else None
            return [] if root is None else [f[0] for f in _dir_identity(root)]
        if isinstance(files, dict):
            files = [f for group in files.values() for f in group]
        return [f for f in files if not _is_remote(f)]

    def _unreadable(self, err: Exception) -> ValueError:
        """One line for a dataset that `datasets` failed to read: the first local file that is
        not UTF-8 text when decoding failed, else the underlying error."""
        cause = err
        while not isinstance(cause, UnicodeDecodeError) and (cause.__cause__ or cause.__context__):
            cause = cause.__cause__ or cause.__context__
        if isinstance(cause, UnicodeDecodeError):
            key = "data.data_files" if self.builder is not None else self.where
            for f in self._local_files():
                where = None if f.endswith(_BINARY_SUFFIXES) else _not_utf8(f)
                if where:
                    return ValueError(f"{key}: {f} is not UTF-8 text ({where}); convert it to "
                                      "UTF-8 or leave it out")
        return ValueError(f"{self.where}: could not be read ({type(cause).__name__}: "
                          f"{' '.join(str(cause).split())})")

    def documents(self, role: str) -> Iterator[str]:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        from datasets.exceptions import DatasetGenerationError
        try:
            yield from self._documents(role)
        except (DatasetGenerationError, UnicodeDecodeError) as err:
            raise self._unreadable(err) from err

    def _documents(self, role: str) -> Iterator[str]:
        splits = self._load()
        where = self.where
        if self.split not in splits:
            raise ValueError(f"data.split={self.split!r} is not a split of {where}; "
                             f"splits: {list(splits)}")
        if self.val_split is not None and self.val_split in splits:
            name = self.split if role == "train" else self.val_split
            yield from self._texts(splits[name], f"{where} split {name!r}")
            return
        # no validation split: carve one off train, identically in both roles
        if self.val_fraction <= 0:
            raise ValueError(f"{where} has no split data.val_split={self.val_split!r} "
                             f"(splits: {list(splits)}) and data.val_fraction=0: nothing to validate on")
        log.info("%s: no split %r, carving %.3g of %r as validation", where, self.val_split,
                 self.val_fraction, self.split)
        want_val = role == "validation"
        for text in self._texts(splits[self.split], f"{where} split {self.split!r}"):
            if is_carved_validation(text, self.val_fraction) == want_val:
                yield text


def hf_corpus(role: str, tokenizer, cache_dir: str, source: HFSource) -> TokenizedCorpus:
    """Tokenized (and cached) documents of `role` ("train" or "validation") of `source`."""
    return load_or_build(cache_dir, f"hf-{role}", source.description(role), tokenizer,
                         lambda: source.documents(role), source=source.where)
