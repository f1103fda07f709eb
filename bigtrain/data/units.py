"""Units: whole documents worth about ``UNIT_BYTES`` of raw input, the grain of ``prepare``'s work.

The main process reads a source's items into units (:func:`text_units`, :func:`jsonl_units`,
:func:`arrow_units`: reading and decompressing, which is cheap); a worker turns a unit into
its documents' texts (:func:`decode`: UTF-8, JSON, Arrow to Python, which is not) and
tokenizes them. A document is never split between units: where a BPE merge or a
pre-tokenizer rule may span a cut, cutting a document would change its tokens. So a unit is
bounded by ``UNIT_BYTES`` or by its one document (a text file is one document; a JSONL line
or a parquet row is one), and memory stays bounded however large the corpus is.
"""
from __future__ import annotations

import gzip
import json
import zlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator, NamedTuple

from bigtrain.errors import ConfigError

REPLACEMENT = "\ufffd"
COMPRESSED = (".gz", ".zst", ".zstd")
UNIT_BYTES = 256 * 2**10  # raw input per unit: ~0.1-0.3 s of BPE encoding, small beside a process's overhead
ARROW_BATCH_ROWS = 1024   # parquet / dataset rows read at a time


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
            raise ConfigError(f"--source {repairs.source!r}: {where} is not valid JSON ({e}); expected JSON Lines, "
                              "one object per line") from None
        text = row.get("text") if isinstance(row, dict) else None
        if not isinstance(row, dict) or not (text is None or isinstance(text, str)):
            what = type(text).__name__ + " in 'text'" if isinstance(row, dict) else type(row).__name__
            raise ConfigError(f"--source {repairs.source!r}: {where} holds {what}, expected an object "
                              "with a string 'text'")
        texts.append(repairs.drop(where) if text is None else text)
    return texts


# ---- reading (main process) ---------------------------------------------------------------

def _stream(path: str):
    """A binary file object, decompressing .gz and .zst."""
    name = path.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith((".zst", ".zstd")):
        return _ZstdReader(path)
    return open(path, "rb")


class _ZstdReader:
    """Decompress a .zst file (several frames allowed), refusing a truncated one: `zstandard`'s
    stream_reader ends quietly at a cut-off frame, which would drop the rest of a file unsaid."""

    def __init__(self, path: str):
        import zstandard
        self._new = zstandard.ZstdDecompressor().decompressobj
        self._file, self._dec, self._open_frame = open(path, "rb"), self._new(), False

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


def read_error(source: str, path: str, e: Exception) -> ConfigError:
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    return ConfigError(f"--source {source!r}: cannot read {path} ({reason})")


def _blocks(source: str, path: str) -> Iterator[bytes]:
    """A file's bytes, decompressed, in blocks of about UNIT_BYTES; a damaged file is one line."""
    import zstandard
    try:
        with _stream(path) as f:
            while block := f.read(UNIT_BYTES):
                yield block
    except (OSError, EOFError, zlib.error, zstandard.ZstdError) as e:
        raise read_error(source, path, e) from None


def text_units(source: str, paths: list[str]) -> Iterator[Unit]:
    """Text files, one document each, grouped into units."""
    batch, size = [], 0
    for path in paths:
        data = b"".join(_blocks(source, path))
        batch.append((path, data))
        size += len(data)
        if size >= UNIT_BYTES:
            yield Unit("text", "", 0, batch)
            batch, size = [], 0
    if batch:
        yield Unit("text", "", 0, batch)


def jsonl_units(source: str, path: str) -> Iterator[Unit]:
    """A JSON Lines file's whole lines, in units."""
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


def arrow_units(source: str, where: str, batches, first_row: int = 0) -> Iterator[Unit]:
    """Arrow string arrays (``batches``: a parquet file's or a dataset's 'text' column), in units."""
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
        raise read_error(source, where, e) from None
    if chunk:
        yield Unit("arrow", where, row, pa.concat_arrays(chunk))


def parquet_batches(source: str, path: str):
    for batch in parquet_file(source, path).iter_batches(batch_size=ARROW_BATCH_ROWS, columns=["text"]):
        yield batch.column(0)


def dataset_batches(path: str, start: int, stop: int):
    table = load_dataset(path).with_format("arrow")[start:stop]
    for batch in table.select(["text"]).to_batches(max_chunksize=ARROW_BATCH_ROWS):
        yield batch.column(0)


def text_column(source: str, where: str, schema) -> None:
    import pyarrow as pa
    if "text" not in schema.names:
        raise ConfigError(f"--source {source!r}: {where} has no 'text' column (columns: {', '.join(schema.names)})")
    kind = schema.field("text").type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ConfigError(f"--source {source!r}: the 'text' column of {where} holds {kind}, expected strings")


def parquet_file(source: str, path: str):
    import pyarrow as pa
    import pyarrow.parquet as pq
    if path.lower().endswith(COMPRESSED):
        raise ConfigError(f"--source {source!r}: {path} is a compressed parquet file; parquet compresses "
                          "inside, decompress the file first")
    try:
        f = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise read_error(source, path, e) from None
    text_column(source, path, f.schema_arrow)
    return f


@lru_cache(maxsize=4)  # one load per dataset, not one per block of rows
def load_dataset(path: str):
    import datasets
    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds and len(ds) != 1:
            raise ConfigError(f"--source {path!r}: a DatasetDict without a 'train' split ({', '.join(ds)})")
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    return ds
