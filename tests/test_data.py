"""Tokenizers, `prepare` and the memory-mapped dataset (bigtrain/data/)."""
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest

from bigtrain.config import ConfigError
from bigtrain.data.dataset import open_data
from bigtrain.data.prepare import prepare
from bigtrain.data.tokenizer import EOT, build_tokenizer, fingerprint, load_tokenizer

UNICODE = "héllo wörld — ünïcödé 🎉 中文 \n\t\r mixed\x00 text\U0010ffff"
DOCS = [f"document number {i}: " + "lorem ipsum dolor " * (i % 7 + 1) for i in range(40)]


@pytest.fixture(scope="module")
def prose(docs_text) -> str:
    """100k characters of English prose (the docstring corpus, tests/corpus.py)."""
    return docs_text[:100_000]


def _hf_round_trip(tok, tmp_path: Path, text: str) -> None:
    from transformers import AutoTokenizer
    assert tok.save_hf(tmp_path / "hf")
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    ids = hf.encode(text, add_special_tokens=False)
    assert ids == tok.encode(text)
    assert hf.decode(ids) == text
    assert hf.eos_token_id == tok.eot_id and len(hf) == tok.vocab_size


def _save_load(tok, tmp_path: Path):
    tok.save(tmp_path / "tok")
    return load_tokenizer(tmp_path / "tok")


def test_bytes_tokenizer(tmp_path):
    tok = build_tokenizer("bytes", lambda: [])
    assert (tok.vocab_size, tok.eot_id, tok.kind) == (257, 256, "bytes")
    ids = tok.encode(UNICODE)
    assert max(ids) < 256 and tok.decode(ids) == UNICODE
    assert tok.decode([104, 105, 256, 104]) == f"hi{EOT}h"
    assert isinstance(tok.decode([0xE2, 0x82, 999, -3, 0xFF]), str)  # never crashes on arbitrary ids
    assert _save_load(tok, tmp_path).encode(UNICODE) == ids
    _hf_round_trip(tok, tmp_path, UNICODE)


def test_char_tokenizer(tmp_path, prose):
    tok = build_tokenizer("char", lambda: [prose])
    assert tok.vocab_size == len(set(prose)) + 1 and tok.eot_id == tok.vocab_size - 1
    ids = tok.encode(prose[:5000])
    assert tok.decode(ids) == prose[:5000]
    again = _save_load(tok, tmp_path)
    assert again.encode(prose[:5000]) == ids and again.vocab_size == tok.vocab_size
    with pytest.raises(ValueError, match="vocabulary"):
        tok.encode("🎉")
    _hf_round_trip(tok, tmp_path, prose[:2000])


def test_bpe_tokenizer(tmp_path, prose):
    tok = build_tokenizer("bpe:512", lambda: [prose])
    assert tok.kind == "bpe" and tok.vocab_size == 512
    ids = tok.encode(prose[:5000])
    assert len(ids) < 5000 / 1.5  # it learned merges
    assert tok.decode(ids) == prose[:5000]
    assert tok.decode(tok.encode(UNICODE)) == UNICODE  # byte level: nothing is out of vocabulary
    assert tok.decode([tok.eot_id]) == EOT
    assert _save_load(tok, tmp_path).encode(UNICODE) == tok.encode(UNICODE)
    _hf_round_trip(tok, tmp_path, prose[:2000])


def test_hf_directory_tokenizer(tmp_path):
    bpe = build_tokenizer("bpe:300", lambda: DOCS)
    bpe.save_hf(tmp_path / "hfdir")
    tok = build_tokenizer(str(tmp_path / "hfdir"), lambda: [])
    assert tok.kind == "hf" and tok.eot_id == bpe.eot_id and tok.vocab_size == bpe.vocab_size
    assert tok.encode(DOCS[3]) == bpe.encode(DOCS[3]) and tok.decode(tok.encode(DOCS[3])) == DOCS[3]
    assert _save_load(tok, tmp_path).encode(DOCS[5]) == bpe.encode(DOCS[5])
    _write_texts(tmp_path / "txt")
    m = prepare(str(tmp_path / "txt" / "*.txt"), str(tmp_path / "hfdir"), str(tmp_path / "out"))
    assert m["tokenizer"]["kind"] == "hf" and m["eot_id"] == bpe.eot_id
    data = open_data(str(tmp_path / "out"))
    assert _all_tokens(data, "train")[:len(bpe.encode(DOCS[0])) + 1] == [*bpe.encode(DOCS[0]), bpe.eot_id]
    assert data.tokenizer.kind == "hf"


def test_directory_without_a_tokenizer(tmp_path):
    with pytest.raises(ConfigError, match="not a loadable Hugging Face tokenizer"):
        build_tokenizer(str(tmp_path), lambda: DOCS)


@pytest.mark.parametrize("spec", ["bpe", "bpe:abc", "bpe:100", "wordpiece", "/no/such/tokenizer/dir", ""])
def test_bad_tokenizer_spec(spec):
    with pytest.raises(ConfigError, match="tokenizer"):
        build_tokenizer(spec, lambda: DOCS)


def _write_texts(directory: Path, docs=DOCS) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for i, d in enumerate(docs):
        (directory / f"doc{i:03d}.txt").write_text(d)


def _all_tokens(data, split: str) -> list[int]:
    s = data.split(split)
    return s.read(0, s.tokens).tolist()


def test_prepare_text_glob_and_read_back(tmp_path):
    _write_texts(tmp_path / "txt")
    m = prepare(str(tmp_path / "txt" / "*.txt"), "bytes", str(tmp_path / "out"), val_fraction=0.1, shard_tokens=500)
    assert m["format_version"] == 1 and m["dtype"] == "uint16" and m["tokenizer"]["kind"] == "bytes"
    assert (m["vocab_size"], m["eot_id"], m["documents"]) == (257, 256, 40)
    assert m["splits"]["val"]["documents"] == 4 and m["splits"]["train"]["documents"] == 36
    train = m["splits"]["train"]
    assert len(train["shards"]) > 2 and all(s["tokens"] == 500 for s in train["shards"][:-1])
    for s in train["shards"]:
        assert hashlib.sha256((tmp_path / "out" / s["file"]).read_bytes()).hexdigest() == s["sha256"]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == m
    assert not (tmp_path / "out.tmp").exists()

    data = open_data(str(tmp_path / "out"))
    assert data.has_split("val") and data.vocab_size == 257
    expected = [t for d in DOCS[:36] for t in [*d.encode(), 256]]
    assert _all_tokens(data, "train") == expected
    assert data.tokenizer.decode(_all_tokens(data, "val")) == EOT.join(DOCS[36:]) + EOT
    split, L = data.split("train"), 63  # samples of 64 tokens cross the 500-token shard boundaries
    assert split.num_samples(L) == len(expected) // 64
    for i in (0, 7, split.num_samples(L) - 1):
        assert split.sample(i, L).tolist() == expected[i * 64:(i + 1) * 64]
    batch = split.batch([3, 0, 7], L)
    assert batch.dtype == np.int64 and batch.shape == (3, 64) and batch[1].tolist() == expected[:64]
    with pytest.raises(IndexError):
        split.sample(split.num_samples(L), L)
    with pytest.raises(IndexError, match="outside"):
        split.batch([0, split.num_samples(L)], L)
    head, tail = split.tail(0.25)
    assert head.tokens + tail.tokens == split.tokens and tail.tokens == round(split.tokens * 0.25)
    assert tail.sample(0, 9).tolist() == expected[head.tokens:head.tokens + 10]
    # a batch is gathered per shard: every window, those across a shard boundary too, in any order
    # and repeated, from a split that starts inside a shard, is the row-by-row read
    for part, seq in ((split, L), (tail, 9), (head, 36)):
        rows = np.random.default_rng(0).permutation(np.repeat(np.arange(part.num_samples(seq)), 2))
        assert part.batch(rows, seq).tolist() == [part.sample(int(i), seq).tolist() for i in rows]
    assert split.batch([], L).shape == (0, 64)


def test_prepare_single_file(tmp_path, prose):
    (tmp_path / "s.txt").write_text(prose)
    m = prepare(str(tmp_path / "s.txt"), "char", str(tmp_path / "out"))
    assert "val" not in m["splits"]  # one document: nothing to hold out (the trainer can use data.val_fraction)
    data = open_data(str(tmp_path / "out"))
    assert data.tokenizer.decode(_all_tokens(data, "train")) == prose + EOT


def test_prepare_jsonl_parquet_and_saved_dataset(tmp_path):
    import datasets
    ds = datasets.Dataset.from_dict({"text": DOCS, "id": list(range(len(DOCS)))})
    with open(tmp_path / "a.jsonl", "w") as f:
        for d in DOCS:
            f.write(json.dumps({"text": d}) + "\n")
    ds.to_parquet(str(tmp_path / "a.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "saved_dict"))
    expected = [t for d in DOCS[:-1] for t in [*d.encode(), 256]]
    for i, source in enumerate([tmp_path / "a.jsonl", tmp_path / "*.parquet", tmp_path / "saved",
                                f"hf:{tmp_path / 'saved_dict'}"]):
        m = prepare(str(source), "bytes", str(tmp_path / f"out{i}"), val_fraction=0.01)
        assert m["documents"] == len(DOCS) and m["splits"]["val"]["documents"] == 1
        assert _all_tokens(open_data(str(tmp_path / f"out{i}")), "train") == expected


def test_prepare_bpe_writes_an_hf_tokenizer(tmp_path):
    _write_texts(tmp_path / "txt")
    prepare(str(tmp_path / "txt" / "*.txt"), "bpe:300", str(tmp_path / "out"))
    data = open_data(str(tmp_path / "out"))
    assert data.manifest["tokenizer"] == {"kind": "bpe", "spec": "bpe:300", "dir": "tokenizer",
                                          "sha256": fingerprint(tmp_path / "out" / "tokenizer")}
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "out" / "tokenizer"))
    assert hf.decode(_all_tokens(data, "train")).startswith(DOCS[0] + EOT + DOCS[1])


def _corrupt(path: Path, truncate: bool) -> None:
    raw = bytearray(path.read_bytes())
    if truncate:
        raw = raw[:-2]
    else:
        raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("truncate", [False, True])
def test_damaged_shard_is_named(tmp_path, truncate):
    _write_texts(tmp_path / "txt")
    prepare(str(tmp_path / "txt" / "*.txt"), "bytes", str(tmp_path / "out"), shard_tokens=300)
    _corrupt(tmp_path / "out" / "train-00001.bin", truncate)
    with pytest.raises(ConfigError, match="train-00001.bin"):
        open_data(str(tmp_path / "out"))
    if not truncate:
        open_data(str(tmp_path / "out"), verify=False)  # sizes still match: only hashing catches it


def test_missing_data_dir_and_manifest(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        open_data(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="manifest"):
        open_data(str(tmp_path / "empty"))


@pytest.mark.parametrize("source, tokenizer, match", [
    ("hf:gpt2", "bytes", "no network download"),
    ("{tmp}/nothing-*.txt", "bytes", "matches no files"),
    ("{tmp}/missing.txt", "bytes", "matches no files"),
    ("{tmp}/empty.txt", "bytes", "empty"),
    ("{tmp}/txt/*.txt", "bpe:12", "at least 257"),
])
def test_bad_input_writes_nothing(tmp_path, source, tokenizer, match):
    _write_texts(tmp_path / "txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ConfigError, match=match) as err:
        prepare(source.format(tmp=tmp_path), tokenizer, str(tmp_path / "out"))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_existing_out_is_not_overwritten(tmp_path):
    _write_texts(tmp_path / "txt")
    out = tmp_path / "out"
    first = prepare(str(tmp_path / "txt" / "*.txt"), "bytes", str(out))
    with pytest.raises(ConfigError, match="not empty"):
        prepare(str(tmp_path / "txt" / "*.txt"), "char", str(out))
    with pytest.raises(ConfigError):  # a failure with overwrite=True leaves the old data intact too
        prepare(str(tmp_path / "missing-*.txt"), "char", str(out), overwrite=True)
    assert open_data(str(out)).manifest == first
    assert prepare(str(tmp_path / "txt" / "*.txt"), "char", str(out), overwrite=True)["tokenizer"]["kind"] == "char"


def test_prepare_stdlib(tmp_path):
    t = time.perf_counter()
    m = prepare("stdlib", "bytes", str(tmp_path / "std"))
    elapsed = time.perf_counter() - t
    train = m["splits"]["train"]
    print(f"stdlib/bytes: {m['documents']} files, {train['tokens'] + m['splits']['val']['tokens']} tokens, "
          f"{elapsed:.1f}s")
    assert m["documents"] > 100 and train["tokens"] > 10**6 and m["splits"]["val"]["documents"] >= 1
    data = open_data(str(tmp_path / "std"))
    assert "def " in data.tokenizer.decode(data.split("train").read(0, 100_000))
