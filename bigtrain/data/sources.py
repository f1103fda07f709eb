"""Where ``bigtrain prepare`` gets its documents: what ``--source`` names, as an ordered list of items.

A source is an ordered list of *items*: its files, or blocks of a saved dataset's rows.
Items are what ``prepare --slice i/n`` divides between machines (contiguous runs, balanced
by size); reading them gives *units* of whole documents (:mod:`bigtrain.data.units`) that
workers tokenize (:mod:`bigtrain.data.encode`).

Kinds: text files (one document each), JSON Lines (``.jsonl``/``.json``, one object with a
``text`` field per line), parquet files (a ``text`` column, read by record batches) and
a dataset saved with ``save_to_disk``. Text and JSONL files may be compressed
(``.gz``, ``.zst``); a directory stands for the parquet or JSONL files under it.
"""
from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from glob import glob, has_magic
from pathlib import Path
from typing import Iterator, NamedTuple

from bigtrain.data.units import (COMPRESSED, Repairs, Unit, arrow_units, dataset_batches, decode, jsonl_units,
                                 load_dataset, parquet_batches, parquet_file, text_column, text_units)
from bigtrain.errors import ConfigError

# The stdlib corpus: the standard library's .py files in sorted path order, up to this much
# text. At 16 MiB it is the whole library on CPython 3.11 (~11 MB, ~670 files) and a
# deterministic prefix on versions with a larger one; `prepare` with `bytes` takes seconds.
STDLIB_MAX_BYTES = 16 * 2**20
STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}
KINDS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}  # by suffix; anything else is text
DATASET_ITEM_ROWS = 8192  # a saved dataset is sliced between machines in blocks of this many rows


class Item(NamedTuple):
    """A piece of the source that slices are made of: a file, or rows [start, stop) of a saved dataset."""
    path: str
    size: int  # bytes (files) or rows (datasets): what slices balance
    start: int = 0
    stop: int = 0


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
            yield from text_units(self.name, [i.path for i in items])
            return
        for item in items:
            if self.kind == "jsonl":
                yield from jsonl_units(self.name, item.path)
            elif self.kind == "parquet":
                yield from arrow_units(self.name, item.path, parquet_batches(self.name, item.path))
            else:
                batches = dataset_batches(item.path, item.start, item.stop)
                yield from arrow_units(self.name, item.path, batches, item.start)

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


def _dataset(source: str, path: str, strict: bool) -> Source:
    ds = load_dataset(path)
    text_column(source, "the dataset", ds.data.schema)
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
            parquet_file(source, f)  # every file's schema now, before any token is written
    return Source(source, kind, [Item(f, os.path.getsize(f)) for f in files], strict)
