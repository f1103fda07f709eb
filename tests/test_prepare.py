"""`bigtrain prepare` in parallel and in slices (bigtrain/data/sources.py, encode.py, parts.py).

The reference is always the plain one-process prepare: N workers, compressed or columnar
inputs and a sliced-then-merged prepare must give the same bytes, file for file.
"""
from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from bigtrain.cli import main
from bigtrain.data.encode import IN_FLIGHT_PER_WORKER, Job, encode_units
from bigtrain.data.prepare import merge, parts_dir, prepare, prepare_slice
from bigtrain.data.units import UNIT_BYTES, Unit

ABSENT = object()  # a JSONL row without a "text" field


@pytest.fixture(scope="module")
def paragraphs(docs_text) -> list[str]:
    """~5000 documents of English prose (the docstring corpus's paragraphs), 0.7 MB in all."""
    paras = docs_text.split("\n\n")
    assert sum(map(len, paras)) > 2 * UNIT_BYTES  # several units: the workers really share the work
    return paras


def _files(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by relative path."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _rows(paragraphs: list[str]) -> list:
    """The paragraphs as JSONL row texts, with a null and a missing text among them (dropped rows)."""
    rows = list(paragraphs)
    rows[7], rows[100] = None, ABSENT
    return rows


def _jsonl(rows: list) -> bytes:
    return b"".join(json.dumps({} if r is ABSENT else {"text": r, "id": i}).encode() + b"\n"
                    for i, r in enumerate(rows))


def _write_formats(root: Path, rows: list, kinds=("jsonl", "gz", "zst", "parquet", "saved")) -> dict[str, str]:
    """The same rows, in three files, as each of ``kinds`` of source; kind -> --source."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard
    thirds = [rows[:1500], rows[1500:1600], rows[1600:]]
    for kind in kinds:
        (root / kind).mkdir(parents=True)
    for i, part in enumerate(thirds):
        data = _jsonl(part)
        if "jsonl" in kinds:
            (root / "jsonl" / f"{i}.jsonl").write_bytes(data)
        if "gz" in kinds:
            (root / "gz" / f"{i}.jsonl.gz").write_bytes(gzip.compress(data))
        if "zst" in kinds:
            half = len(data) // 2 + data[len(data) // 2:].index(b"\n") + 1  # two zstd frames, cut at a line
            zst = zstandard.ZstdCompressor(write_checksum=True)
            (root / "zst" / f"{i}.jsonl.zst").write_bytes(zst.compress(data[:half]) + zst.compress(data[half:]))
        if "parquet" in kinds:
            texts = [None if r is ABSENT else r for r in part]
            (root / "parquet" / f"sub{i // 2}").mkdir(exist_ok=True)  # a directory of parquet, nested
            pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}),
                           root / "parquet" / f"sub{i // 2}" / f"{i}.parquet", row_group_size=300)
    if "parquet" in kinds:
        (root / "parquet" / ".cache").mkdir()
        (root / "parquet" / ".cache" / "junk.parquet").write_text("hidden files are not the data")
    if "saved" in kinds:
        datasets.Dataset.from_dict({"text": [None if r is ABSENT else r for r in rows]}).save_to_disk(
            str(root / "saved"))
    return {"jsonl": str(root / "jsonl" / "*.jsonl"), "gz": str(root / "gz" / "*.gz"),
            "zst": str(root / "zst"), "parquet": str(root / "parquet"), "saved": f"hf:{root / 'saved'}"}


@pytest.mark.slow  # starts worker processes
@pytest.mark.parametrize("kind, tokenizer", [("txt", "bytes"), ("txt", "bpe:300"), ("zst", "bytes"),
                                             ("parquet", "bytes")])
def test_any_number_of_workers_writes_the_same_bytes(tmp_path, paragraphs, kind, tokenizer):
    if kind == "txt":
        (tmp_path / "txt").mkdir()
        for i in range(24):  # 24 text files, one document each, of ~30 kB
            (tmp_path / "txt" / f"{i:02d}.txt").write_text("\n\n".join(paragraphs[i::24]))
        source = str(tmp_path / "txt" / "*.txt")
    else:  # units of JSON lines or of Arrow arrays go to the workers instead
        source = _write_formats(tmp_path / "src", _rows(paragraphs), kinds=(kind,))[kind]
    one, two = tmp_path / "one", tmp_path / "two"
    m1 = prepare(source, tokenizer, str(one), val_fraction=0.1, shard_tokens=50_000, workers=1)
    m2 = prepare(source, tokenizer, str(two), val_fraction=0.1, shard_tokens=50_000, workers=2)
    assert m1 == m2 and len(m1["splits"]["train"]["shards"]) > 2
    assert _files(one) == _files(two)
    assert not any(p.name.endswith((".tmp", ".parts")) for p in tmp_path.iterdir())


def test_compressed_jsonl_parquet_dirs_and_datasets_give_the_same_tokens(tmp_path, paragraphs):
    rows = _rows(paragraphs)
    sources = _write_formats(tmp_path / "src", rows)
    outs = {}
    for kind, source in sources.items():
        outs[kind] = tmp_path / kind
        m = prepare(source, "bytes", str(outs[kind]), val_fraction=0.01, shard_tokens=100_000, workers=1)
        assert m["repairs"] == {"replaced_chars": 0, "replaced_docs": 0, "dropped_rows": 2}, kind
        assert m["documents"] == len(rows)
    reference = _files(outs["jsonl"])
    for kind in sources:
        files = _files(outs[kind])
        assert files.pop("manifest.json") and files == {k: v for k, v in reference.items() if k != "manifest.json"}
    # and the tokens are the documents', in order: text bytes then the separator, the last 1% held out
    n_val = round(len(rows) * 0.01)
    stream = [np.fromfile(outs["zst"] / s["file"], dtype="<u2") for split in ("train", "val")
              for s in json.loads((outs["zst"] / "manifest.json").read_text())["splits"][split]["shards"]]
    texts = [r.encode() for r in rows if isinstance(r, str) and r]
    expected = b"".join(t + b"\xff" for t in texts)  # 0xff never occurs in UTF-8: a stand-in for 256
    got = np.concatenate(stream)
    assert bytes(np.where(got == 256, 0xFF, got).astype(np.uint8)) == expected
    train_tokens = sum(len(r.encode()) + 1 for r in rows[:len(rows) - n_val] if isinstance(r, str) and r)
    assert json.loads((outs["zst"] / "manifest.json").read_text())["splits"]["train"]["tokens"] == train_tokens


def _refused(capsys, tmp_path: Path, args: list[str]) -> str:
    """``bigtrain prepare ARGS --out OUT``: exit 2, one line, nothing written."""
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["prepare", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert not out.exists() and not Path(f"{out}.tmp").exists(), "nothing written"
    return err


def _damage(path: Path, how: str) -> None:
    raw = bytearray(path.read_bytes())
    if how == "truncate":
        raw = raw[:len(raw) // 2]
    else:
        raw[len(raw) // 2] ^= 0x55
    path.write_bytes(bytes(raw))


BAD_INPUTS = {
    # name: (make the bad source under root; return its --source), part of the one line
    "truncated zst": (lambda r: _damage(r / "zst" / "2.jsonl.zst", "truncate") or str(r / "zst"),
                      "2.jsonl.zst (the file ends inside a zstd frame"),
    "corrupt zst": (lambda r: _damage(r / "zst" / "2.jsonl.zst", "flip") or str(r / "zst"), "2.jsonl.zst ("),
    "not zstd": (lambda r: _put(r / "zst" / "1.jsonl.zst", "{}", r / "zst"), "1.jsonl.zst ("),
    "truncated gz": (lambda r: _damage(r / "gz" / "2.jsonl.gz", "truncate") or str(r / "gz" / "*.gz"),
                     "2.jsonl.gz ("),
    "corrupt gz": (lambda r: _damage(r / "gz" / "0.jsonl.gz", "flip") or str(r / "gz" / "*.gz"), "0.jsonl.gz ("),
    "parquet without text": (lambda r: _parquet(r, {"body": ["a", "b"]}), "has no 'text' column (columns: body)"),
    "parquet text of ints": (lambda r: _parquet(r, {"text": [1, 2]}), "'text' column of"),
    "not parquet": (lambda r: _put(r / "parquet" / "sub0" / "0.parquet", "no", r / "parquet"), "0.parquet ("),
    "bad json line": (lambda r: _append(r, b'{"text": "fine"}\n{"text": oops}\n'), "(from 0) is not valid JSON"),
    "json row not an object": (lambda r: _append(r, b'["text"]\n'), "(from 0) holds list, expected"),
    "json text not a string": (lambda r: _append(r, b'{"text": 3}\n'), "holds int in 'text', expected"),
    "dir of text": (lambda r: _put(r / "txt" / "a.txt", "a", r / "txt"), "a directory without parquet or JSONL"),
}


def _put(path: Path, text: str, source: Path) -> str:
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return str(source)


def _parquet(root: Path, columns: dict) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table(columns), root / "parquet" / "sub1" / "2.parquet")
    return str(root / "parquet")


def _append(root: Path, lines: bytes) -> str:
    """Bad lines at the end of the last (third) JSONL file: read by a worker, after good units."""
    with open(root / "jsonl" / "2.jsonl", "ab") as f:
        f.write(lines)
    return str(root / "jsonl" / "*.jsonl")


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, paragraphs, case):
    make, expected = BAD_INPUTS[case]
    _write_formats(tmp_path, _rows(paragraphs), kinds=("jsonl", "gz", "zst", "parquet"))
    line = _refused(capsys, tmp_path, ["--source", make(tmp_path), "--tokenizer", "bytes", "--workers", "1"])
    assert expected in line, line


@pytest.mark.slow  # starts worker processes
@pytest.mark.parametrize("case", ["bad json line", "truncated zst"])
def test_bad_input_met_while_workers_run(tmp_path, capsys, paragraphs, case):
    """Met by a worker (a JSON line) or by the main process while the workers tokenize (the
    third file of a .zst source): the same one line, the workers stopped, nothing written."""
    make, expected = BAD_INPUTS[case]
    _write_formats(tmp_path, _rows(paragraphs), kinds=("jsonl", "zst"))
    line = _refused(capsys, tmp_path, ["--source", make(tmp_path), "--tokenizer", "bytes", "--workers", "2"])
    assert expected in line, line


@pytest.mark.parametrize("args, expected", [
    (["--workers", "0"], "--workers 0: expected at least 1"),
    (["--slice", "2/2"], "expected I/N with 0 <= I < N"),
    (["--slice", "one/2"], "expected I/N, e.g. 3/16"),
    (["--slice", "0/2", "--merge"], "two steps"),
    (["--merge"], "no parts in"),
])
def test_bad_command_lines(tmp_path, capsys, args, expected):
    (tmp_path / "a.txt").write_text("some text")
    line = _refused(capsys, tmp_path, ["--source", str(tmp_path / "a.txt"), "--tokenizer", "bytes", *args])
    assert expected in line, line


def test_a_slice_needs_a_tokenizer_not_learnt_from_the_corpus(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("some text")
    line = _refused(capsys, tmp_path, ["--source", str(tmp_path / "a.txt"), "--tokenizer", "bpe:300",
                                       "--slice", "0/2"])
    assert "learnt from the corpus" in line and "OUT/tokenizer" in line


def _sliced(source: str, tokenizer: str, out: Path, count: int, **cut) -> dict:
    for i in reversed(range(count)):  # any order: tasks of an array run as they are scheduled
        prepare_slice(source, tokenizer, str(out), i, count, workers=1)
    return merge(source, tokenizer, str(out), **cut)


def test_slices_and_a_merge_write_what_one_machine_writes(tmp_path, paragraphs, capsys):
    rows = _rows(paragraphs)
    src = tmp_path / "src"
    src.mkdir()
    sizes = [40, 900, 3, 0, 1200, 700, 1, 2000]  # rows per file, empty files too: slices of unequal size
    for i, (a, b) in enumerate(zip(np.cumsum([0, *sizes[:-1]]), np.cumsum(sizes))):
        (src / f"{i}.jsonl").write_bytes(_jsonl(rows[a:b]))
    # a tokenizer dir (not learnt by the slices themselves), as a user would pass it
    prepare(str(src / "1.jsonl"), "bpe:300", str(tmp_path / "tok"), workers=1)
    cut = {"val_fraction": 0.02, "shard_tokens": 20_000}
    for t, tokenizer in enumerate(("bytes", str(tmp_path / "tok" / "tokenizer"))):
        one = tmp_path / f"one-{t}"
        reference = prepare(str(src / "*.jsonl"), tokenizer, str(one), workers=1, **cut)
        for count in (3, 11) if tokenizer == "bytes" else (3,):  # 11 slices of 8 files: some are empty
            out = tmp_path / f"sliced-{t}-{count}"
            assert _sliced(str(src / "*.jsonl"), tokenizer, out, count, **cut) == reference
            assert _files(out) == _files(one), (tokenizer, count)
            assert not parts_dir(out).exists()

    # a rerun slice keeps its part (a requeued array redoes only what failed)...
    out = tmp_path / "out"
    part = prepare_slice(str(src / "*.jsonl"), "bytes", str(out), 1, 3, workers=1)
    mtime = (part["path"] / "part.json").stat().st_mtime_ns
    assert prepare_slice(str(src / "*.jsonl"), "bytes", str(out), 1, 3, workers=1)["path"] == part["path"]
    assert (part["path"] / "part.json").stat().st_mtime_ns == mtime
    # ... but a part of another prepare is not taken for it, and a merge needs every slice
    line = _refused(capsys, tmp_path, ["--source", str(src / "[0-6].jsonl"), "--tokenizer", "bytes",
                                       "--slice", "1/3"])
    assert "holds a part of another prepare; pass --overwrite" in line
    for i in (0, 2):
        prepare_slice(str(src / "*.jsonl"), "bytes", str(out), i, 3, workers=1)
    prepare_slice(str(src / "*.jsonl"), "bytes", str(out), 0, 2, workers=1)  # a stray part of another count
    line = _refused(capsys, tmp_path, ["--source", str(src / "*.jsonl"), "--tokenizer", "bytes", "--merge"])
    assert "parts of 2 and 3 slices are mixed" in line
    (parts_dir(out) / "part-00000-of-00002").rename(tmp_path / "aside")
    (parts_dir(out) / "part-00001-of-00003").rename(tmp_path / "aside1")
    line = _refused(capsys, tmp_path, ["--source", str(src / "*.jsonl"), "--tokenizer", "bytes", "--merge"])
    assert "expected slices 0..2 of 3 once each, found 0/3, 2/3 (missing 1)" in line
    line = _refused(capsys, tmp_path, ["--source", str(src / "*.jsonl"), "--tokenizer", "char", "--merge"])
    assert "(missing 1)" in line


@pytest.mark.slow  # starts worker processes
def test_at_most_two_units_per_worker_are_in_flight(tmp_path):
    """The pool reads ahead of what it has handed back by a bounded number of units: memory does
    not grow with the corpus however fast the source can be read."""
    from bigtrain.data.tokenizer import build_tokenizer
    tok = build_tokenizer("bytes", lambda: [])
    tok.save(tmp_path / "tok")
    read = []

    def units():
        for i in range(40):
            read.append(i)
            yield Unit("text", "", 0, [(f"doc{i}", b"x" * 1000)])

    job = Job("test", False, str(tmp_path / "tok"), "bytes", "bytes", "uint16")
    handed = 0
    for encoded in encode_units(units(), job, workers=2):
        handed += 1
        assert len(encoded.tokens) == 1001 and len(read) - handed <= IN_FLIGHT_PER_WORKER * 2
    assert handed == 40
