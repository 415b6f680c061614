"""The Hugging Face `datasets` source, offline, on small files written into tmp_path."""
import json
import os

import numpy as np
import pytest

from data import ByteTokenizer, HFSource, build_data, hf_corpus
from data_fixtures import cache_dir, hf_offline, rng  # noqa: F401  (pytest fixtures)


def _docs(rng, n=40):
    words = ["alpha", "beta", "gamma", "délta", "ε", "\n", "zeta"]
    return [" ".join(words[j] for j in rng.integers(0, len(words), size=rng.integers(1, 30))) + f" #{i}"
            for i in range(n)]


def _write_jsonl(path, docs, field="text"):
    with open(path, "w", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({field: d, "id": i}) + "\n")
    return str(path)


def _write_parquet(path, docs):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": docs, "id": list(range(len(docs)))}), str(path))
    return str(path)


def test_json_files_with_carved_validation(hf_offline, rng):
    docs = _docs(rng, 60)
    path = _write_jsonl(hf_offline / "a.jsonl", docs)
    src = HFSource(builder="json", data_files=path, val_fraction=0.3)
    train, val = list(src.documents("train")), list(src.documents("validation"))
    assert train and val and not set(train) & set(val)
    assert sorted(train + val) == sorted(docs)
    assert train == [d for d in docs if d in set(train)]  # file order is kept


def test_parquet_glob_and_list(hf_offline, rng):
    docs = _docs(rng, 30)
    _write_parquet(hf_offline / "part-0.parquet", docs[:15])
    _write_parquet(hf_offline / "part-1.parquet", docs[15:])
    by_glob = HFSource(builder="parquet", data_files=str(hf_offline / "part-*.parquet"),
                       val_fraction=0.2)
    by_list = HFSource(builder="parquet", val_fraction=0.2,
                       data_files=[str(hf_offline / "part-0.parquet"), str(hf_offline / "part-1.parquet")])
    for src in (by_glob, by_list):
        got = list(src.documents("train")) + list(src.documents("validation"))
        assert sorted(got) == sorted(docs)


def test_text_files_are_one_document_each(hf_offline):
    for i in range(3):
        (hf_offline / f"t{i}.txt").write_text(f"first line of {i}\nsecond line\n", encoding="utf-8")
    src = HFSource(builder="text", data_files=str(hf_offline / "t*.txt"), val_fraction=0.0001)
    train = list(src.documents("train"))
    assert len(train) == 3 and all("second line" in d for d in train)


def test_local_directory_with_validation_split(hf_offline, rng):
    root = hf_offline / "dataset"
    root.mkdir()
    train_docs, val_docs = _docs(rng, 20), _docs(rng, 5)
    _write_jsonl(root / "train.jsonl", train_docs)
    _write_jsonl(root / "validation.jsonl", val_docs)
    src = HFSource(path=str(root))
    assert list(src.documents("train")) == train_docs
    assert list(src.documents("validation")) == val_docs
    assert list(HFSource(path=str(root), max_docs=7).documents("train")) == train_docs[:7]


def test_streaming_gives_the_same_documents(hf_offline, rng):
    docs = _docs(rng, 50)
    path = _write_jsonl(hf_offline / "s.jsonl", docs)
    for role in ("train", "validation"):
        plain = list(HFSource(builder="json", data_files=path, val_fraction=0.2).documents(role))
        streamed = list(HFSource(builder="json", data_files=path, val_fraction=0.2,
                                 streaming=True).documents(role))
        assert plain == streamed
    capped = HFSource(builder="json", data_files=path, streaming=True, max_docs=10, val_fraction=0.2)
    assert sorted(list(capped.documents("train")) + list(capped.documents("validation"))) == sorted(docs[:10])


@pytest.mark.parametrize("streaming", [False, True])
def test_missing_text_field(hf_offline, rng, streaming):
    path = _write_jsonl(hf_offline / "b.jsonl", _docs(rng, 5), field="body")
    src = HFSource(builder="json", data_files=path, text_field="text", streaming=streaming)
    with pytest.raises(ValueError, match=r"data.text_field='text'.*body"):
        list(src.documents("train"))
    assert list(HFSource(builder="json", data_files=path, text_field="body", val_fraction=0.1)
                .documents("train"))


def test_configuration_errors(hf_offline, rng):
    with pytest.raises(ValueError, match="data.path"):
        HFSource()
    with pytest.raises(ValueError, match="data.path"):
        HFSource(path=str(hf_offline / "nowhere"))
    with pytest.raises(ValueError, match="data.data_files"):
        HFSource(builder="json", data_files=str(hf_offline / "*.nothing"))
    with pytest.raises(ValueError, match="data.data_files"):
        HFSource(builder="json")
    with pytest.raises(ValueError, match="data.builder"):
        HFSource(builder="csv", data_files="x.csv")
    path = _write_jsonl(hf_offline / "c.jsonl", _docs(rng, 5))
    with pytest.raises(ValueError, match="data.split"):
        list(HFSource(builder="json", data_files=path, split="dev").documents("train"))
    with pytest.raises(ValueError, match="data.val_fraction"):
        list(HFSource(builder="json", data_files=path, val_fraction=0).documents("validation"))


def test_cache_key_follows_file_contents(hf_offline, rng, cache_dir):
    path = _write_jsonl(hf_offline / "d.jsonl", _docs(rng, 20))
    src = HFSource(builder="json", data_files=path, val_fraction=0.2)
    before = src.description("train")
    first = hf_corpus("train", ByteTokenizer(), cache_dir, src)
    _write_jsonl(hf_offline / "d.jsonl", _docs(rng, 21))
    os.utime(path, ns=(1, 1))  # even a same-second rewrite must change the identity
    after = HFSource(builder="json", data_files=path, val_fraction=0.2)
    assert after.description("train") != before
    second = hf_corpus("train", ByteTokenizer(), cache_dir, after)
    assert first.path != second.path


def test_build_data_hf_uses_cache(hf_offline, rng, cache_dir, monkeypatch):
    path = _write_jsonl(hf_offline / "e.jsonl", _docs(rng, 200))
    cfg = {"source": "hf", "tokenizer": "bytes", "path": "???", "name": None, "data_files": [path],
           "builder": "json", "split": "train", "val_split": "validation", "val_fraction": 0.1,
           "text_field": "text", "streaming": False, "max_docs": None, "val_batches": 2,
           "shuffle": True, "document_mask": True, "cache_dir": cache_dir}
    tok, train, val = build_data(cfg, seq_len=32, micro_batch=2, grad_accum=1, seed=0)
    first = train.next_step()

    def offline(self):
        raise AssertionError("dataset opened again despite the cache")

    monkeypatch.setattr(HFSource, "_load", offline)
    _, train2, val2 = build_data(cfg, seq_len=32, micro_batch=2, grad_accum=1, seed=0)
    for a, b in zip(first, train2.next_step()):
        assert np.array_equal(a["input_ids"], b["input_ids"])
    assert len(val2) == len(val) == 2


def test_configs_data_hf_yaml(hf_offline, rng, cache_dir):
    """The lead's configs/data/hf.yaml, with `path: ???` left unset, drives build_data."""
    yaml = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "data", "hf.yaml")
    if not os.path.exists(yaml):
        pytest.skip("configs/data/hf.yaml not present")
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(yaml)
    path = _write_parquet(hf_offline / "f.parquet", _docs(rng, 300))
    cfg.merge_with({"tokenizer": "bytes", "builder": "parquet", "data_files": path,
                    "val_fraction": 0.2, "cache_dir": cache_dir, "val_batches": 2})
    tok, train, val = build_data(cfg, seq_len=16, micro_batch=2, grad_accum=1)
    assert tok.name == "bytes" and len(val) == 2 and len(train.next_step()) == 1


@pytest.mark.parametrize("streaming", [False, True])
def test_binary_file_is_named_in_one_line(hf_offline, streaming):
    """A file that is not UTF-8 (here, in a dataset folder and as a text data file) is named,
    with the first bad byte, instead of `datasets`' DatasetGenerationError."""
    import re
    root = hf_offline / "corpus"
    root.mkdir()
    (root / "a.txt").write_text("fine text\n", encoding="utf-8")
    (root / "b.txt").write_bytes("éa".encode() + b"\xff\xfe binary")
    with pytest.raises(ValueError, match="^" + re.escape(
            f"data.path={str(root)!r}: {root / 'b.txt'} is not UTF-8 text (byte 0xff at offset "
            "3); convert it to UTF-8 or leave it out") + "$"):
        list(HFSource(path=str(root), streaming=streaming).documents("train"))
    with pytest.raises(ValueError, match="^" + re.escape(
            f"data.data_files: {root / 'b.txt'} is not UTF-8 text (byte 0xff at offset 3)")):
        list(HFSource(builder="text", data_files=str(root / "*.txt"), streaming=streaming)
             .documents("train"))


def test_not_utf8_offset_across_read_chunks(tmp_path):
    """The offset is the file's, also past the first 1 MiB read and with a multi-byte character
    split by a read boundary."""
    from data.hf import _not_utf8
    f = tmp_path / "x.txt"
    f.write_bytes(b"a" * ((1 << 20) - 1) + "é".encode() * 3)
    assert _not_utf8(str(f)) is None
    f.write_bytes(b"a" * ((1 << 20) - 1) + "é".encode() * 3 + b"\x80")
    assert _not_utf8(str(f)) == f"byte 0x80 at offset {(1 << 20) - 1 + 6}"
    f.write_bytes(b"a" * 10 + "é".encode()[:1])  # cut short at the end of the file
    assert _not_utf8(str(f)) == "byte 0xc3 at offset 10"


def test_empty_corpus_names_its_source(hf_offline, cache_dir):
    (hf_offline / "empty.txt").write_text("", encoding="utf-8")
    src = HFSource(builder="text", data_files=str(hf_offline / "empty.txt"))
    with pytest.raises(ValueError, match=r"^data.data_files=\[.*empty.txt'\] holds no text for "
                                         r"the hf-train corpus: no non-empty document$"):
        hf_corpus("train", ByteTokenizer(), cache_dir, src)


def test_val_batches_must_be_positive_when_validating(hf_offline, rng, cache_dir):
    path = _write_jsonl(hf_offline / "g.jsonl", _docs(rng, 200))
    cfg = {"source": "hf", "tokenizer": "bytes", "data_files": [path], "builder": "json",
           "val_fraction": 0.1, "val_batches": 0, "cache_dir": cache_dir}
    with pytest.raises(ValueError, match=r"^data.val_batches=0 must be an integer >= 1 \(validation "
                                         r"micro-batches per evaluation\); trainer.val_every=0 "
                                         r"turns validation off$"):
        build_data(cfg, seq_len=32, micro_batch=2, grad_accum=1)
    _, _, val = build_data(cfg, seq_len=32, micro_batch=2, grad_accum=1, with_val=False)
    assert val == []
