"""Tokenizers: raw UTF-8 bytes (no dependencies, the CPU default) or any Hugging Face tokenizer.

Both expose the same small interface the data pipeline needs: `name` (part of the cache key),
`vocab_size`, `bos_id` (the document separator put at the start of every document),
`encode(text) -> list[int]` without special tokens, `encode_batch(texts)` and `decode(ids)`.
"""
from __future__ import annotations

from typing import Iterable, Sequence


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, plus one extra id (256) that marks the start of a document."""

    name = "bytes"
    vocab_size = 257
    bos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # goes through encode() so a patched/overridden encode is honoured everywhere
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        # the separator (and anything out of byte range) has no text; broken UTF-8 sequences
        # (e.g. a window cut mid-character) decode to U+FFFD instead of raising
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class HFTokenizer:
    """A `transformers.AutoTokenizer` behind the same interface as ByteTokenizer."""

    def __init__(self, name_or_path: str):
        try:
            from transformers import AutoTokenizer  # optional extra: only needed for this class
        except ImportError as e:
            raise ImportError(
                f"data.tokenizer={name_or_path!r} needs the Hugging Face `transformers` package, "
                "which is not installed: `pip install .[hf]` (or use data.tokenizer=bytes)"
            ) from e
        self.name = str(name_or_path)
        self._tok = AutoTokenizer.from_pretrained(name_or_path)
        self.vocab_size = len(self._tok)
        # Many LM tokenizers (GPT-2 family) have no BOS; their EOS works just as well as a
        # separator, since every document is preceded by it.
        bos = self._tok.bos_token_id
        if bos is None:
            bos = self._tok.eos_token_id
        if bos is None:
            raise ValueError(
                f"data.tokenizer={name_or_path!r} has neither a bos_token_id nor an eos_token_id; "
                "the packer needs one of them as the document separator")
        self.bos_id = int(bos)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # fast (Rust) tokenizers parallelise a batch call internally
        out = self._tok(list(texts), add_special_tokens=False)["input_ids"]
        return [list(ids) for ids in out]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name!r})"


def build_tokenizer(name: str):
    """"bytes" -> ByteTokenizer; anything else is a Hugging Face hub name or local path."""
    if name == "bytes":
        return ByteTokenizer()
    return HFTokenizer(name)
