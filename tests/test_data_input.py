"""Hostile data input (issue 16, items 3 and 4 and the data cases of its degraded list), tried
as a user types it: ``bigtrain train|prepare`` through ``bigtrain.cli.main``. Each must end in one
line on stderr and exit status 2, with no run directory written and nothing prepared lost.

The list, as the issue filed it:
- eval data (``data.val_path``) prepared with another tokenizer: another vocab_size, or the
  same vocab_size with other ids (harmful 3: trained the whole run, then crashed in the final eval)
- a manifest that lists a shard twice (harmful 4: every sample read twice per epoch), token
  counts that disagree with the file size, a dtype that cannot hold the vocabulary, a
  vocab_size below the largest token in the shards (crashed at step 1 after writing the run
  dir), malformed fields, a prepared dir without its tokenizer/ or with another one
- ``prepare`` on a source that is not UTF-8 or has rows without text: counted in the summary
  line and the manifest; ``--strict`` refuses it and writes nothing
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bigtrain.cli import main
from helpers import REPO, tiny_overrides

SMOKE = str(REPO / "configs" / "smoke.yaml")


def _refused(capsys, argv: list[str]) -> str:
    """Run ``bigtrain ARGV``; it must exit 2 with exactly one line on stderr, which is returned."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err.strip()


def _train_refused(capsys, tmp_path: Path, data: str, **extra) -> str:
    run = tmp_path / "run"
    line = _refused(capsys, ["train", SMOKE, *tiny_overrides(data, run, **extra)])
    assert not run.exists()  # refused before anything was written
    return line


def _prepare(tmp_path: Path, name: str, text: str, tokenizer: str) -> str:
    src = tmp_path / f"{name}.txt"
    src.write_text(text)
    out = tmp_path / name
    assert main(["prepare", "--source", str(src), "--tokenizer", tokenizer, "--out", str(out),
                 "--val-fraction", "0"]) == 0
    return str(out)


# ---- harmful 3: the eval data's tokenizer -------------------------------------------------

def test_val_path_with_another_vocab_size_is_refused(tmp_path, capsys, prose_char, prose_bytes):
    line = _train_refused(capsys, tmp_path, prose_char, data__val_path=prose_bytes)
    assert "data.val_path" in line and "vocab_size 257 vs" in line


def test_val_path_with_the_same_vocab_size_but_other_ids_is_refused(tmp_path, capsys, docs_text):
    """``char`` on two texts with as many distinct characters: same vocab_size, other ids."""
    text = docs_text[:20000]
    absent = next(c for c in "§¤µ¶" if c not in text)
    swapped = text.replace("e", absent)  # 'e' gone, a new character in its place
    train = _prepare(tmp_path, "train", text, "char")
    val = _prepare(tmp_path, "val", swapped, "char")
    line = _train_refused(capsys, tmp_path, train, data__val_path=val)
    assert "data.val_path" in line and "other token ids" in line


@pytest.mark.parametrize("tokenizer", ["char", "bpe:300"])
def test_val_path_with_the_same_tokenizer_is_accepted(tmp_path, docs_text, tokenizer):
    """The refusal is not a false alarm: the same tokenizer, even re-saved through ``transformers``
    (``prepare --tokenizer TRAIN/tokenizer``, what the refusal advises), is accepted."""
    from bigtrain.config import load_config
    from bigtrain.data.splits import open_splits
    train = _prepare(tmp_path, "train", docs_text[:20000], tokenizer)
    val = _prepare(tmp_path, "val", docs_text[:5000], str(Path(train) / "tokenizer"))
    _, _, split = open_splits(load_config(overrides=tiny_overrides(train, tmp_path / "run", data__val_path=val)))
    assert split.tokens > 0


# ---- harmful 4 and degraded: manifests validated fully --------------------------------------

def _twice(m):
    m["splits"]["train"]["shards"] *= 2
    m["splits"]["train"]["tokens"] *= 2


def _tokens_off(m):
    m["splits"]["train"]["shards"][0]["tokens"] += 1
    m["splits"]["train"]["tokens"] += 1


def _dtype_too_small(m):
    m["vocab_size"] = 70000  # uint16 holds ids below 65536


def _vocab_below_tokens(m):
    m["vocab_size"], m["eot_id"] = 100, 0  # the shards hold byte ids up to 256


def _tokens_not_a_number(m):
    m["splits"]["train"]["shards"][0]["tokens"] = "many"


def _dtype_unknown(m):
    m["dtype"] = "float32"


MANIFEST_CASES = {
    "shard listed twice": (_twice, "twice"),
    "token count vs file size": (_tokens_off, "bytes, expected"),
    "dtype cannot hold the vocabulary": (_dtype_too_small, "cannot hold vocab_size 70000"),
    "vocab_size below the tokens": (_vocab_below_tokens, "token id 256"),
    "token count not a number": (_tokens_not_a_number, "'many'"),
    "unknown dtype": (_dtype_unknown, "float32"),
}


@pytest.mark.parametrize("case", MANIFEST_CASES)
def test_bad_manifest_is_refused_at_start(tmp_path, capsys, prose_bytes, case):
    edit, expected = MANIFEST_CASES[case]
    data = tmp_path / "data"
    shutil.copytree(prose_bytes, data)
    manifest = json.loads((data / "manifest.json").read_text())
    edit(manifest)
    (data / "manifest.json").write_text(json.dumps(manifest))
    line = _train_refused(capsys, tmp_path, str(data), model__vocab_size=manifest["vocab_size"])
    assert str(data) in line and expected in line, line


def test_prepared_dir_without_its_tokenizer_is_refused(tmp_path, capsys, prose_bytes):
    """Training would work, but ``export`` and ``inspect`` would refuse the run afterwards."""
    data = tmp_path / "data"
    shutil.copytree(prose_bytes, data)
    shutil.rmtree(data / "tokenizer")
    line = _train_refused(capsys, tmp_path, str(data))
    assert "tokenizer" in line and "export" in line


def test_prepared_dir_with_another_tokenizer_is_refused(tmp_path, capsys, prose_char, docs_text):
    data = tmp_path / "data"
    shutil.copytree(prose_char, data)
    other = _prepare(tmp_path, "other", docs_text[:20000].replace("e", "§"), "char")
    shutil.rmtree(data / "tokenizer")
    shutil.copytree(Path(other) / "tokenizer", data / "tokenizer")
    line = _train_refused(capsys, tmp_path, str(data))
    assert "not the tokenizer the shards were made with" in line


# ---- degraded: prepare says what it replaced or dropped ------------------------------------

def _sources(tmp_path: Path) -> dict[str, tuple[str, dict]]:
    """Source kind -> (--source, the repairs it needs)."""
    txt = tmp_path / "txt"
    txt.mkdir()
    (txt / "a.txt").write_text("plain text, and a U+FFFD of its own: \ufffd\n" * 20)
    (txt / "b.txt").write_bytes(b"latin-1 caf\xe9, binary \xff\xfe\x00\x01 and more text\n" * 10)
    rows = [{"text": "a row"}, {"title": "no text field"}, {"text": None}, {"text": "another row"}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {
        "text": (str(txt / "*.txt"), {"replaced_chars": 30, "replaced_docs": 1, "dropped_rows": 0}),
        "jsonl": (str(tmp_path / "rows.jsonl"), {"replaced_chars": 0, "replaced_docs": 0, "dropped_rows": 2}),
    }


@pytest.mark.parametrize("tokenizer", ["bytes", "char"])  # char reads the source twice: counted once
@pytest.mark.parametrize("kind", ["text", "jsonl"])
def test_prepare_counts_what_it_replaced_or_dropped(tmp_path, capsys, kind, tokenizer):
    source, repairs = _sources(tmp_path)[kind]
    out = tmp_path / "out"
    assert main(["prepare", "--source", source, "--tokenizer", tokenizer, "--out", str(out)]) == 0
    summary = capsys.readouterr().out.strip()
    assert json.loads((out / "manifest.json").read_text())["repairs"] == repairs
    if repairs["replaced_docs"]:
        assert "1 documents not valid UTF-8 (30 byte sequences replaced with U+FFFD)" in summary
    if repairs["dropped_rows"]:
        assert "2 rows without text dropped" in summary
    assert summary.count("\n") == 0 and "--strict" in summary


@pytest.mark.parametrize("kind", ["text", "jsonl"])
def test_prepare_strict_refuses_and_keeps_what_was_there(tmp_path, capsys, kind):
    source, _ = _sources(tmp_path)[kind]
    out = tmp_path / "out"
    line = _refused(capsys, ["prepare", "--source", source, "--tokenizer", "char", "--out", str(out), "--strict"])
    assert ("b.txt is not valid UTF-8" if kind == "text" else "row 1 (from 0) has no text") in line
    assert not out.exists() and not (tmp_path / "out.tmp").exists()
    # over an existing prepared dir (--overwrite), the refusal loses nothing
    keep = tmp_path / "keep.txt"
    keep.write_text("the data that was there\n" * 10)
    assert main(["prepare", "--source", str(keep), "--tokenizer", "bytes", "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    _refused(capsys, ["prepare", "--source", source, "--tokenizer", "bytes", "--out", str(out),
                      "--strict", "--overwrite"])
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_prepare_strict_accepts_a_clean_source(tmp_path, capsys):
    src = tmp_path / "clean.txt"
    src.write_text("clean text with its own \ufffd character\n" * 10)
    assert main(["prepare", "--source", str(src), "--tokenizer", "bytes", "--out", str(tmp_path / "out"),
                 "--strict"]) == 0
    assert "WARNING" not in capsys.readouterr().out


def test_prepare_with_a_tokenizer_that_cannot_encode_the_source(tmp_path, capsys):
    """A ``char`` tokenizer dir reused on text with other characters: one line, not a traceback."""
    chars = _prepare(tmp_path, "chars", "abc abc\n" * 10, "char")
    (tmp_path / "other.txt").write_text("xyz\n" * 10)
    line = _refused(capsys, ["prepare", "--source", str(tmp_path / "other.txt"), "--tokenizer",
                             str(Path(chars) / "tokenizer"), "--out", str(tmp_path / "out")])
    assert "cannot encode" in line and not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()
