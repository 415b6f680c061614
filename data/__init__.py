"""Corpus, tokenizer and packing: everything between raw text and the model's micro-batches.

`build_data(cfg, ...)` reads the `data` config group (configs/data/*.yaml):
    builtin: source, tokenizer, max_bytes, val_percent, val_batches, shuffle, document_mask,
             cache_dir
    passkey: source, tokenizer, digits, max_bytes (of the builtin corpus the haystack comes
             from), val_batches, cache_dir
    mqar:    source, tokenizer, n_pairs, n_keys, n_values, min_len, val_batches
    recall:  the mqar and passkey keys, and passkey_share (the fraction of passkey rows)
    hf:      source, tokenizer, path, name, data_files, builder, split, val_split,
             val_fraction, text_field, streaming, max_docs, val_batches, shuffle,
             document_mask, cache_dir
and returns (tokenizer, train PackedBatches, validation micro-batches for this rank).
Tokenized corpora are cached under `cache_dir`; concurrent builders (every rank at once) are
safe because cache files are written atomically.
"""
from __future__ import annotations

import logging
import os
import warnings

import numpy as np

from data.builtin import builtin_corpus
from data.hf import HFSource, hf_corpus
from data.loader import PackedBatches, val_batches
from data.packing import cu_seqlens, num_rows, positions
from data.synthetic import MQAR, Mixture, Passkey, SyntheticBatches
from data.token_cache import TokenizedCorpus
from data.tokenizer import ByteTokenizer, HFTokenizer, build_tokenizer

__all__ = ["ByteTokenizer", "HFTokenizer", "build_tokenizer", "PackedBatches", "val_batches",
           "build_data", "builtin_corpus", "hf_corpus", "HFSource", "TokenizedCorpus",
           "num_rows", "positions", "cu_seqlens", "SOURCES", "default_cache_dir", "synthetic_task"]

log = logging.getLogger(__name__)

SOURCES = ("builtin", "hf", "passkey", "mqar", "recall")
_COMMON_KEYS = {"source", "tokenizer", "val_batches", "shuffle", "document_mask", "cache_dir"}
_KEYS = {
    "builtin": _COMMON_KEYS | {"max_bytes", "val_percent"},
    "hf": _COMMON_KEYS | {"path", "name", "data_files", "builder", "split", "val_split",
                          "val_fraction", "text_field", "streaming", "max_docs"},
    "passkey": {"source", "tokenizer", "digits", "max_bytes", "val_batches", "cache_dir"},
    "mqar": {"source", "tokenizer", "n_pairs", "n_keys", "n_values", "min_len", "val_batches",
             "cache_dir"},
}
_KEYS["recall"] = _KEYS["mqar"] | _KEYS["passkey"] | {"passkey_share"}


def default_cache_dir() -> str:
    return os.path.expanduser(os.environ.get("LONGCTX_CACHE", "~/.cache/longctx"))


def _get(cfg, key: str, default=None):
    """cfg[key] as plain Python (a DictConfig's lists/dicts converted); a missing key or an
    unset mandatory value (`???`) gives `default`."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # plain dicts still work without omegaconf
        DictConfig = None
    if DictConfig is not None and isinstance(cfg, DictConfig):
        if key not in cfg or OmegaConf.is_missing(cfg, key):
            return default
        value = cfg[key]
        if isinstance(value, (DictConfig, ListConfig)):
            return OmegaConf.to_container(value, resolve=True)
        return value
    value = cfg.get(key, default)
    return default if isinstance(value, str) and value == "???" else value


def _keys(cfg) -> set[str]:
    return {str(k) for k in cfg.keys()}


def build_data(cfg, seq_len: int, micro_batch: int, grad_accum: int, dp_rank: int = 0,
               dp_world: int = 1, seed: int = 0, with_val: bool = True):
    """-> (tokenizer, train: PackedBatches, val: list of this rank's micro-batch dicts).
    `with_val=False` (no validation in the run) reads no validation split and returns []."""
    source = _get(cfg, "source")
    if source not in SOURCES:
        raise ValueError(f"data.source must be one of {SOURCES}, got {source!r}")
    unknown = _keys(cfg) - _KEYS[source]
    if unknown:
        warnings.warn(f"data: ignoring unknown keys {sorted(unknown)} for data.source={source} "
                      f"(known: {sorted(_KEYS[source])})")
    n_val = _get(cfg, "val_batches", 8)
    if with_val and (isinstance(n_val, bool) or not isinstance(n_val, int) or n_val < 1):
        raise ValueError(f"data.val_batches={n_val!r} must be an integer >= 1 (validation "
                         "micro-batches per evaluation); trainer.val_every=0 turns validation off")
    tokenizer = build_tokenizer(str(_get(cfg, "tokenizer", "bytes")))
    cache_dir = os.path.expanduser(str(_get(cfg, "cache_dir") or default_cache_dir()))
    if source in ("passkey", "mqar", "recall"):
        loader = SyntheticBatches(synthetic_task(cfg, tokenizer, seq_len, cache_dir), seq_len,
                                  micro_batch, grad_accum, dp_rank, dp_world, seed)
        return tokenizer, loader, loader.validation(n_val) if with_val else []

    if source == "builtin":
        caps = {"max_bytes": int(_get(cfg, "max_bytes", 4_000_000)),
                "val_percent": int(_get(cfg, "val_percent", 5))}
        train = builtin_corpus("train", tokenizer, cache_dir, **caps)
        val = builtin_corpus("validation", tokenizer, cache_dir, **caps) if with_val else None
    else:
        src = HFSource(
            path=_get(cfg, "path"), name=_get(cfg, "name"), data_files=_get(cfg, "data_files"),
            builder=_get(cfg, "builder"), split=_get(cfg, "split", "train"),
            val_split=_get(cfg, "val_split", "validation"),
            val_fraction=float(_get(cfg, "val_fraction", 0.01)),
            text_field=_get(cfg, "text_field", "text"), streaming=bool(_get(cfg, "streaming", False)),
            max_docs=_get(cfg, "max_docs"))
        train = hf_corpus("train", tokenizer, cache_dir, src)
        val = hf_corpus("validation", tokenizer, cache_dir, src) if with_val else None

    document_mask = bool(_get(cfg, "document_mask", True))
    loader = PackedBatches(train.tokens, seq_len, micro_batch, grad_accum, dp_rank, dp_world,
                           shuffle=bool(_get(cfg, "shuffle", True)), seed=seed,
                           document_mask=document_mask, bos_id=tokenizer.bos_id)
    val_list = [] if val is None else val_batches(
        val.tokens, seq_len, micro_batch, n_val, dp_rank, dp_world,
        document_mask, bos_id=tokenizer.bos_id)
    log.info("data: %s/%s, train %d tokens (%d docs, %d rows, %d steps/epoch), val %d tokens",
             source, tokenizer.name, len(train.tokens), len(train.doc_starts), loader.rows,
             loader.steps_per_epoch, 0 if val is None else len(val.tokens))
    return tokenizer, loader, val_list


def _int(cfg, key: str, default: int) -> int:
    value = _get(cfg, key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"data.{key}={value!r} must be an integer")
    return value


def _pairs(cfg) -> int | tuple:
    value = _get(cfg, "n_pairs", 8)
    if isinstance(value, (list, tuple)) and value and all(
            isinstance(n, int) and not isinstance(n, bool) for n in value):
        return tuple(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"data.n_pairs={value!r} must be an integer or a list of integers")
    return value


def synthetic_task(cfg, tokenizer, seq_len: int, cache_dir: str | None = None):
    """The task of `data=passkey` / `data=mqar` / `data=recall` (data/synthetic.py), checked
    against the tokenizer and seq_len (passkey: its haystack is the builtin corpus's training
    split; recall: rows of both, `passkey_share` of them passkey)."""
    source = _get(cfg, "source")
    if source in ("mqar", "recall"):
        task = MQAR(n_pairs=_pairs(cfg), n_keys=_int(cfg, "n_keys", 64),
                    n_values=_int(cfg, "n_values", 64), min_len=_int(cfg, "min_len", 0))
        task.check(tokenizer.vocab_size, seq_len)
        if source == "mqar":
            return task
        share = _get(cfg, "passkey_share", 0.5)
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share < 1:
            raise ValueError(f"data.passkey_share={share!r} must be a number in (0, 1) (the "
                             "fraction of passkey rows; data=mqar or data=passkey for one task)")
        keys = {k: _get(cfg, k) for k in _KEYS["passkey"]}
        passkey = synthetic_task({**{k: v for k, v in keys.items() if v is not None},
                                  "source": "passkey"}, tokenizer, seq_len, cache_dir)
        return Mixture(tasks=(task, passkey), weights=(1 - share, share))
    cache_dir = cache_dir or os.path.expanduser(str(_get(cfg, "cache_dir") or default_cache_dir()))
    hay = builtin_corpus("train", tokenizer, cache_dir, max_bytes=_int(cfg, "max_bytes", 4_000_000))
    tokens = hay.tokens[hay.tokens != tokenizer.bos_id]  # one running text, no separators
    task = Passkey.build(tokenizer, tokens, digits=_int(cfg, "digits", 5))
    task.sample(np.random.default_rng(0), seq_len)  # the row fits (one clear error if not)
    return task
