import sys
import types

import pytest

from data import ByteTokenizer, HFTokenizer, build_tokenizer
from data_fixtures import rng  # noqa: F401  (pytest fixture)


def _random_text(rng, n=200):
    # ASCII, accented Latin, CJK and emoji: 1- to 4-byte UTF-8 sequences
    alphabet = list("abc XYZ\n\t{}()") + ["é", "ß", "漢", "字", "🙂", "\u2028"]
    return "".join(alphabet[i] for i in rng.integers(0, len(alphabet), size=n))


def test_byte_tokenizer_round_trip(rng):
    tok = ByteTokenizer()
    assert (tok.name, tok.vocab_size, tok.bos_id) == ("bytes", 257, 256)
    for _ in range(5):
        text = _random_text(rng)
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert all(0 <= i < 256 for i in ids)  # no separator added
        assert tok.decode(ids) == text
        assert tok.encode_batch([text, ""]) == [ids, []]


def test_byte_tokenizer_decode_skips_separator_and_replaces_broken_utf8():
    tok = ByteTokenizer()
    assert tok.decode([256, 104, 105, 256]) == "hi"
    cut = tok.encode("é")[:1]  # half of a 2-byte character
    assert tok.decode(cut) == "\ufffd"


def test_build_tokenizer_bytes():
    assert isinstance(build_tokenizer("bytes"), ByteTokenizer)


def test_hf_tokenizer_without_transformers(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(ImportError) as err:
        build_tokenizer("gpt2")
    assert "data.tokenizer" in str(err.value) and "pip install .[hf]" in str(err.value)


class _FakeHFTokenizer:
    """Stands in for a transformers tokenizer: ids are character codes mod 50, vocab 60."""

    def __init__(self, bos, eos):
        self.bos_token_id, self.eos_token_id = bos, eos

    def __len__(self):
        return 60

    def encode(self, text, add_special_tokens=True):
        assert add_special_tokens is False
        return [ord(c) % 50 for c in text]

    def __call__(self, texts, add_special_tokens=True):
        return {"input_ids": [self.encode(t, add_special_tokens) for t in texts]}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(97 + i % 26) for i in ids)


def _fake_transformers(monkeypatch, bos, eos):
    module = types.ModuleType("transformers")
    module.AutoTokenizer = types.SimpleNamespace(from_pretrained=lambda name: _FakeHFTokenizer(bos, eos))
    monkeypatch.setitem(sys.modules, "transformers", module)


def test_hf_tokenizer_wraps_auto_tokenizer(monkeypatch):
    _fake_transformers(monkeypatch, bos=None, eos=55)
    tok = build_tokenizer("some/tokenizer")
    assert isinstance(tok, HFTokenizer)
    assert (tok.name, tok.vocab_size, tok.bos_id) == ("some/tokenizer", 60, 55)  # eos fallback
    assert tok.encode("abc") == [97 % 50, 98 % 50, 99 % 50]
    assert tok.encode_batch(["ab", "c"]) == [tok.encode("ab"), tok.encode("c")]

    _fake_transformers(monkeypatch, bos=7, eos=55)
    assert HFTokenizer("x").bos_id == 7


def test_hf_tokenizer_without_bos_or_eos(monkeypatch):
    _fake_transformers(monkeypatch, bos=None, eos=None)
    with pytest.raises(ValueError, match="data.tokenizer"):
        HFTokenizer("x")
