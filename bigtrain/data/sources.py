"""Where ``bigtrain prepare`` gets its documents: ``--source`` as an ordered stream of work units.

A source is an ordered list of *items*: its files, or blocks of a saved dataset's rows.
Items are what ``prepare --slice i/n`` divides between machines (contiguous runs, balanced
by size). Reading items gives *units*: whole documents worth about ``UNIT_BYTES`` of raw
input (text files, JSON lines, an Arrow array of a parquet column), each of which one
worker decodes and tokenizes alone (:mod:`bigtrain.data.encode`). The main process reads
and decompresses, which is cheap; workers decode, parse and tokenize, which is not.

A document is never split between units: where a BPE merge or a pre-tokenizer rule may
span a cut, cutting a document would change its tokens. So a unit's size is bounded by
``UNIT_BYTES`` or by its one document (a text file is one document; a JSONL line or a
parquet row is one), and memory stays bounded however large the corpus is.

Kinds: text files (one document each), JSON Lines (``.jsonl``/``.json``, one object with a
``text`` field per line), parquet files (a ``text`` column, read by record batches) and
a dataset saved with ``save_to_disk``. Text and JSONL files may be compressed
(``.gz``, ``.zst``); a directory stands for the parquet or JSONL files under it.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import sysconfig
import zlib
from dataclasses import dataclass
from glob import glob, has_magic
from pathlib import Path
from typing import Iterator, NamedTuple

from bigtrain.errors import ConfigError

REPLACEMENT = "\ufffd"
# The stdlib corpus: the standard library's .py files in sorted path order, up to this much
# text. At 16 MiB it is the whole library on CPython 3.11 (~11 MB, ~670 files) and a
# deterministic prefix on versions with a larger one; `prepare` with `bytes` takes seconds.
STDLIB_MAX_BYTES = 16 * 2**20
STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}
KINDS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}  # by suffix; anything else is text
COMPRESSED = (".gz", ".zst", ".zstd")
UNIT_BYTES = 256 * 2**10  # raw input per unit: ~0.1-0.3 s of BPE encoding, small beside a process's overhead
ARROW_BATCH_ROWS = 1024   # parquet / dataset rows read at a time
DATASET_ITEM_ROWS = 8192  # a saved dataset is sliced between machines in blocks of this many rows


@dataclass
class Repairs:
    """What reading changed: bytes that are not UTF-8 become U+FFFD, a row without text becomes
    an empty document (nothing written). ``strict`` refuses the first one instead, naming it.
    Each unit counts its own; the manifest records the sum over the pass that wrote the shards."""
    source: str
    strict: bool = False
    replaced_chars: int = 0
    replaced_docs: int = 0
    dropped_rows: int = 0

    def decode(self, data: bytes, where: str) -> str:
        text = data.decode("utf-8", errors="replace")
        # the source's own U+FFFD characters are valid UTF-8 (EF BF BD) and not a repair
        replaced = text.count(REPLACEMENT) - data.count(REPLACEMENT.encode())
        if replaced:
            self._refuse(f"{where} is not valid UTF-8 ({replaced} undecodable byte sequences)")
            self.replaced_chars += replaced
            self.replaced_docs += 1
        return text

    def drop(self, where: str) -> str:
        self._refuse(f"{where} has no text")
        self.dropped_rows += 1
        return ""

    def add(self, counts: tuple[int, int, int]) -> None:
        self.replaced_chars += counts[0]
        self.replaced_docs += counts[1]
        self.dropped_rows += counts[2]

    def counts(self) -> tuple[int, int, int]:
        return self.replaced_chars, self.replaced_docs, self.dropped_rows

    def to_dict(self) -> dict:
        return {"replaced_chars": self.replaced_chars, "replaced_docs": self.replaced_docs,
                "dropped_rows": self.dropped_rows}

    def _refuse(self, problem: str) -> None:
        if self.strict:
            raise ConfigError(f"--source {self.source!r}: {problem}; --strict refuses it, nothing was written")


class Item(NamedTuple):
    """A piece of the source that slices are made of: a file, or rows [start, stop) of a saved dataset."""
    path: str
    size: int  # bytes (files) or rows (datasets): what slices balance
    start: int = 0
    stop: int = 0


class Unit(NamedTuple):
    """Whole documents that one worker decodes and tokenizes: ``data`` is [(path, bytes)] for
    text files, JSON lines (bytes) for jsonl, one pyarrow string array for parquet and datasets;
    ``where`` and ``first_row`` (from 0) place jsonl/arrow rows in messages."""
    kind: str
    where: str
    first_row: int
    data: object


def decode(unit: Unit, repairs: Repairs) -> list[str]:
    """A unit's documents as text (runs in the workers)."""
    if unit.kind == "text":
        return [repairs.decode(data, path) for path, data in unit.data]
    if unit.kind == "jsonl":
        return _json_rows(unit, repairs)
    return [repairs.drop(f"{unit.where} row {unit.first_row + i} (from 0)") if t is None else t
            for i, t in enumerate(unit.data.to_pylist())]


def _json_rows(unit: Unit, repairs: Repairs) -> list[str]:
    lines = unit.data.split(b"\n")
    if lines[-1] == b"":  # the newline that ends the last line
        lines.pop()
    texts = []
    for i, line in enumerate(lines):
        where = f"{unit.where} row {unit.first_row + i} (from 0)"
        if not line.strip():
            texts.append(repairs.drop(where))
            continue
        try:
            row = json.loads(repairs.decode(line, where))
        except ValueError as e:
            raise ConfigError(f"--source {repairs.source!r}: {where} is not valid JSON ({e})") from None
        text = row.get("text") if isinstance(row, dict) else None
        if not isinstance(row, dict) or not (text is None or isinstance(text, str)):
            what = type(text).__name__ + " in 'text'" if isinstance(row, dict) else type(row).__name__
            raise ConfigError(f"--source {repairs.source!r}: {where} holds {what}, expected an object "
                              "with a string 'text'")
        texts.append(repairs.drop(where) if text is None else text)
    return texts


@dataclass
class Source:
    """The documents ``--source`` names, in order, as items and the units reading them gives."""
    name: str
    kind: str  # text | jsonl | parquet | dataset
    items: list[Item]
    strict: bool = False

    def units(self, start: int = 0, stop: int | None = None) -> Iterator[Unit]:
        """The units of items [start, stop), read lazily: one unit in memory at a time."""
        items = self.items[start:stop]
        if self.kind == "text":
            yield from _text_units(self.name, items)
            return
        for item in items:
            if self.kind == "jsonl":
                yield from _jsonl_units(self.name, item.path)
            elif self.kind == "parquet":
                yield from _arrow_units(self.name, item.path, _parquet_batches(self.name, item.path))
            else:
                yield from _arrow_units(self.name, item.path, _dataset_batches(item), item.start)

    def texts(self) -> Iterator[str]:
        """Every document in order, in this process (for tokenizers that learn from the corpus)."""
        repairs = Repairs(self.name, self.strict)
        for unit in self.units():
            yield from decode(unit, repairs)

    def slice(self, index: int, count: int) -> tuple[int, int]:
        """Items [start, stop) of slice ``index`` of ``count``: contiguous, balanced by size (an item
        belongs to the slice its midpoint falls in), so that slices concatenate to the whole."""
        total = sum(i.size for i in self.items)
        bounds, before = [], 0
        for item in self.items:
            mid = (before + item.size / 2) / total if total else 0.5
            bounds.append(min(count - 1, int(mid * count)))
            before += item.size
        return sum(b < index for b in bounds), sum(b <= index for b in bounds)  # bounds never decrease

    def fingerprint(self) -> str:
        """sha256 of the item list: slices of one source agree on it, so a merge can tell parts
        made from another listing (files added, grown or renamed) from its own."""
        return hashlib.sha256(json.dumps([list(i) for i in self.items]).encode()).hexdigest()


# ---- reading (main process) ---------------------------------------------------------------

def _stream(source: str, path: str):
    """A binary file object, decompressing .gz and .zst."""
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith((".zst", ".zstd")):
        return _ZstdReader(path)
    return open(path, "rb")


class _ZstdReader:
    """Decompress a .zst file (several frames allowed), refusing a truncated one: `zstandard`'s
    stream_reader ends quietly at a cut-off frame, which would drop the rest of a file unsaid."""

    def __init__(self, path: str):
        import zstandard
        self._new = zstandard.ZstdDecompressor().decompressobj
        self._file, self._dec, self._open_frame, self.path = open(path, "rb"), self._new(), False, path

    def read(self, size: int) -> bytes:
        out = []
        while not out:
            raw = self._file.read(size)
            if not raw:
                if self._open_frame:
                    raise EOFError("the file ends inside a zstd frame (truncated)")
                return b""
            while raw:
                out.append(self._dec.decompress(raw))
                self._open_frame = True
                if self._dec.eof:  # a frame ended: the rest is the next frame
                    raw, self._dec, self._open_frame = self._dec.unused_data, self._new(), False
                else:
                    raw = b""
            out = [b for b in out if b]
        return b"".join(out)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()


def _read_errors(source: str, path: str, e: Exception) -> ConfigError:
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    return ConfigError(f"--source {source!r}: cannot read {path} ({reason})")


def _blocks(source: str, path: str) -> Iterator[bytes]:
    """A file's bytes, decompressed, in blocks of about UNIT_BYTES; a damaged file is one line."""
    import zstandard
    try:
        with _stream(source, path) as f:
            while block := f.read(UNIT_BYTES):
                yield block
    except (OSError, EOFError, zlib.error, zstandard.ZstdError) as e:
        raise _read_errors(source, path, e) from None


def _text_units(source: str, items: list[Item]) -> Iterator[Unit]:
    batch, size = [], 0
    for item in items:
        data = b"".join(_blocks(source, item.path))
        batch.append((item.path, data))
        size += len(data)
        if size >= UNIT_BYTES:
            yield Unit("text", "", 0, batch)
            batch, size = [], 0
    if batch:
        yield Unit("text", "", 0, batch)


def _jsonl_units(source: str, path: str) -> Iterator[Unit]:
    row, rest = 0, b""
    for block in _blocks(source, path):
        data = rest + block
        cut = data.rfind(b"\n") + 1  # whole lines only; a longer line waits for its end
        rest = data[cut:]
        if cut:
            yield Unit("jsonl", path, row, data[:cut])
            row += data.count(b"\n", 0, cut)
    if rest:
        yield Unit("jsonl", path, row, rest)


def _arrow_units(source: str, where: str, batches, first_row: int = 0) -> Iterator[Unit]:
    import pyarrow as pa
    chunk, size, row = [], 0, first_row
    try:
        for array in batches:
            chunk.append(array)
            size += array.nbytes
            if size >= UNIT_BYTES:
                # concat copies just these rows: pickling a slice would pickle its whole buffer
                yield Unit("arrow", where, row, pa.concat_arrays(chunk))
                row += sum(len(a) for a in chunk)
                chunk, size = [], 0
    except (OSError, pa.ArrowException) as e:
        raise _read_errors(source, where, e) from None
    if chunk:
        yield Unit("arrow", where, row, pa.concat_arrays(chunk))


def _parquet_batches(source: str, path: str):
    for batch in _parquet(source, path).iter_batches(batch_size=ARROW_BATCH_ROWS, columns=["text"]):
        yield batch.column(0)


def _dataset_batches(item: Item):
    table = _load_dataset(item.path).with_format("arrow")[item.start:item.stop]
    for batch in table.select(["text"]).to_batches(max_chunksize=ARROW_BATCH_ROWS):
        yield batch.column(0)


# ---- opening: what --source names ---------------------------------------------------------

def _stdlib_files() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in STDLIB_SKIP_DIRS]
        found += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    chosen, total = [], 0
    for p in sorted(found, key=lambda p: p.relative_to(root).as_posix()):
        size = p.stat().st_size
        if total + size > STDLIB_MAX_BYTES:
            break
        chosen.append(str(p))
        total += size
    return chosen


def _kind(path: str) -> str:
    name = path.lower()
    for ext in COMPRESSED:
        name = name.removesuffix(ext)
    return KINDS.get(Path(name).suffix, "text")


def _text_column(source: str, where: str, schema) -> None:
    import pyarrow as pa
    if "text" not in schema.names:
        raise ConfigError(f"--source {source!r}: {where} has no 'text' column (columns: {', '.join(schema.names)})")
    kind = schema.field("text").type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ConfigError(f"--source {source!r}: the 'text' column of {where} holds {kind}, expected strings")


def _parquet(source: str, path: str):
    import pyarrow as pa
    import pyarrow.parquet as pq
    if path.lower().endswith(COMPRESSED):
        raise ConfigError(f"--source {source!r}: {path} is a compressed parquet file; parquet compresses "
                          "inside, decompress the file first")
    try:
        f = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise _read_errors(source, path, e) from None
    _text_column(source, path, f.schema_arrow)
    return f


def _load_dataset(path: str):
    import datasets
    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds and len(ds) != 1:
            raise ConfigError(f"--source {path!r}: a DatasetDict without a 'train' split ({', '.join(ds)})")
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    return ds


def _dataset(source: str, path: str, strict: bool) -> Source:
    ds = _load_dataset(path)
    _text_column(source, "the dataset", ds.data.schema)
    n = len(ds)
    items = [Item(path, min(n, a + DATASET_ITEM_ROWS) - a, a, min(n, a + DATASET_ITEM_ROWS))
             for a in range(0, n, DATASET_ITEM_ROWS)]
    return Source(source, "dataset", items, strict)


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file())


def _files(source: str) -> list[str]:
    path = Path(source)
    if path.is_dir():
        found = sorted(str(p) for p in path.rglob("*") if p.is_file() and _kind(p.name) != "text"
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not found:
            raise ConfigError(f"--source {source!r} is a directory without parquet or JSONL files; "
                              f"for text files pass a glob such as '{source}/**/*.txt'")
        return found
    if path.is_file():
        return [source]
    return sorted(p for p in glob(source, recursive=True) if Path(p).is_file()) if has_magic(source) else []


def open_source(source: str, strict: bool = False) -> Source:
    """The documents ``--source`` names; ``strict`` refuses undecodable bytes and rows without
    text (:class:`Repairs`). What can be checked without reading the data is checked here."""
    if source == "stdlib":
        return Source(source, "text", [Item(p, os.path.getsize(p)) for p in _stdlib_files()], strict)
    if source.startswith("hf:"):
        path = Path(source[3:])
        if not _is_saved_dataset(path):
            raise ConfigError(f"--source {source!r}: no local dataset saved with save_to_disk at {str(path)!r}; "
                              "prepare does no network download, so pass a local path instead")
        return _dataset(source, str(path), strict)
    if _is_saved_dataset(Path(source)):
        return _dataset(source, source, strict)
    files = _files(source)
    if not files:
        raise ConfigError(f"--source {source!r} matches no files")
    kinds = {_kind(f) for f in files}
    if len(kinds) > 1:
        raise ConfigError(f"--source {source!r} mixes file kinds ({', '.join(sorted(kinds))}); use one kind")
    kind = kinds.pop()
    if kind == "parquet":
        for f in files:
            _parquet(source, f)  # every file's schema now, before any token is written
    return Source(source, kind, [Item(f, os.path.getsize(f)) for f in files], strict)
