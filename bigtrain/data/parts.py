"""Parts: the tokens of one slice of a source, and the cut that turns parts into shards.

A part (``prepare --slice i/n`` writes one per SLURM array task; a one-machine ``prepare``
writes a single one in its temp dir)::

    part.json            its slice and items, the source's fingerprint, tokenizer, counts, sha256s
    tokens-00000.bin ... the slice's documents' tokens, each followed by eot, in order
    documents.bin        uint64 little-endian: each document's end offset in tokens (empty ones too)
    tokenizer/           the tokenizer, as prepare saves it

:func:`cut` turns parts 0..n-1 into a prepared dir. The held-out ``val`` split is the last
``val_fraction`` of *documents* and shards hold ``shard_tokens`` tokens each; both depend
only on the concatenated token stream and the document ends, not on how the stream was
divided into parts, so the n-part result is byte for byte the one-part result: a SLURM
array prepare trains exactly as a one-machine prepare of the same files.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from bigtrain.data.manifest import FORMAT_VERSION
from bigtrain.data.tokenizer import fingerprint
from bigtrain.errors import ConfigError

PART_VERSION = 1
PART_FILE_TOKENS = 2**27  # tokens per part file; a one-machine cut deletes each once copied
COPY_TOKENS = 2**22       # tokens read at a time while cutting
# what every part of one prepare must agree on
SHARED = ("source", "strict", "items_total", "items_sha256", "tokenizer", "vocab_size", "eot_id", "dtype")


class ShardWriter:
    """Appends tokens to ``SPLIT-NNNNN.bin`` files of ``shard_tokens`` each, hashing as it writes."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self._file = None

    def write(self, tokens: np.ndarray) -> None:
        tokens = tokens.astype(self.dtype, copy=False)
        while len(tokens):
            if self._file is None:
                name = f"{self.split}-{len(self.shards):05d}.bin"
                self._file, self._hash = open(self.directory / name, "wb"), hashlib.sha256()
                self.shards.append({"file": name, "tokens": 0, "sha256": ""})
            shard = self.shards[-1]
            head = tokens[: self.shard_tokens - shard["tokens"]]
            data = head.tobytes()
            self._file.write(data)
            self._hash.update(data)
            shard["tokens"] += len(head)
            tokens = tokens[len(head):]
            if shard["tokens"] == self.shard_tokens:
                self._finish()

    def _finish(self) -> None:
        self._file.close()
        self.shards[-1]["sha256"] = self._hash.hexdigest()
        self._file = None

    def close(self) -> list[dict]:
        if self._file is not None:
            self._finish()
        return self.shards


class PartWriter:
    """Writes a part from encoded units, in order."""

    def __init__(self, directory: Path, dtype: np.dtype):
        self.directory = directory
        self.tokens = ShardWriter(directory, "tokens", dtype, PART_FILE_TOKENS)
        self._ends = open(directory / "documents.bin", "wb")
        self.documents = self.total = 0

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        self.tokens.write(tokens)
        ends = self.total + np.cumsum(lengths, dtype=np.int64)
        self._ends.write(ends.astype("<u8").tobytes())
        self.documents += len(lengths)
        self.total += int(lengths.sum())

    def close(self, meta: dict) -> dict:
        self._ends.close()
        meta = {"part_version": PART_VERSION, **meta, "documents": self.documents, "tokens": self.total,
                "files": self.tokens.close()}
        (self.directory / "part.json").write_text(json.dumps(meta, indent=1) + "\n")
        return meta


def read_part(path: Path) -> dict:
    """A part's part.json (with ``path`` added), its files' sizes checked."""
    try:
        meta = json.loads((path / "part.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"part {str(path)!r}: no readable part.json ({e.__class__.__name__}); "
                          "did its `prepare --slice` finish?") from None
    if not isinstance(meta, dict) or meta.get("part_version") != PART_VERSION:
        raise ConfigError(f"part {str(path)!r}: part.json is not a version {PART_VERSION} part")
    meta["path"] = path
    _check_sizes(meta)
    return meta


def read_parts(paths: list[Path]) -> list[dict]:
    """The part.json of every part, checked: one prepare's slices 0..n-1, each once, whose items
    follow one another. Sorted by slice."""
    parts = sorted((read_part(p) for p in paths), key=lambda m: m["slice"][0])
    counts = sorted({p["slice"][1] for p in parts})
    if len(counts) > 1:
        raise ConfigError(f"parts of {' and '.join(map(str, counts))} slices are mixed in "
                          f"{str(parts[0]['path'].parent)!r}; remove the parts of the other prepare")
    count = counts[0]
    for key in SHARED:
        other = next((p for p in parts if p[key] != parts[0][key]), None)
        if other is not None:
            raise ConfigError(f"parts {str(parts[0]['path'])!r} and {str(other['path'])!r} differ in {key} "
                              f"({parts[0][key]!r} vs {other[key]!r}); they are not slices of one prepare")
    slices = [p["slice"] for p in parts]
    if slices != [[i, count] for i in range(count)]:
        missing = sorted(set(range(count)) - {s[0] for s in slices})
        raise ConfigError(f"parts: expected slices 0..{count - 1} of {count} once each, found "
                          f"{', '.join(f'{i}/{n}' for i, n in slices)}"
                          + (f" (missing {', '.join(map(str, missing))})" if missing else ""))
    stop = 0
    for p in parts:
        if p["items"][0] != stop:
            raise ConfigError(f"part {str(p['path'])!r}: its items start at {p['items'][0]}, expected {stop}")
        stop = p["items"][1]
    if stop != parts[0]["items_total"]:
        raise ConfigError(f"parts cover items [0, {stop}) of {parts[0]['items_total']}")
    return parts


def _check_sizes(part: dict) -> None:
    itemsize = np.dtype(part["dtype"]).itemsize
    expected = [(f["file"], f["tokens"] * itemsize) for f in part["files"]]
    expected.append(("documents.bin", part["documents"] * 8))
    for name, size in expected:
        path = part["path"] / name
        if not path.is_file() or path.stat().st_size != size:
            raise ConfigError(f"part {str(part['path'])!r}: {name} is missing or not {size} bytes; "
                              "run its slice again")


def _document_ends(part: dict) -> np.ndarray:
    if part["documents"] == 0:
        return np.zeros(0, np.int64)
    return np.memmap(part["path"] / "documents.bin", dtype="<u8", mode="r")


def _nonempty(parts: list[dict], first: int, stop: int) -> int:
    """How many of documents [first, stop) (numbered over all parts) hold tokens."""
    count, base = 0, 0
    for part in parts:
        ends = _document_ends(part)
        lo, hi = max(first - base, 0), min(stop - base, len(ends))
        for a in range(lo, hi, COPY_TOKENS):
            b = min(hi, a + COPY_TOKENS)
            chunk = np.asarray(ends[max(a - 1, 0):b], dtype=np.int64)
            starts = np.concatenate([[0], chunk[:-1]]) if a == 0 else chunk[:-1]
            count += int(np.count_nonzero(chunk[-(b - a):] - starts))
        base += len(ends)
    return count


def _cut_offset(parts: list[dict], doc: int) -> int:
    """Where document ``doc`` (numbered over all parts) starts in the whole token stream."""
    tokens = docs = 0
    for part in parts:
        if doc < docs + part["documents"]:
            local = doc - docs
            return tokens + (int(_document_ends(part)[local - 1]) if local else 0)
        tokens, docs = tokens + part["tokens"], docs + part["documents"]
    return tokens


def _stream(parts: list[dict], consume: bool):
    """The whole token stream in chunks, each part file's sha256 checked as it is read."""
    for part in parts:
        dtype = np.dtype(part["dtype"]).newbyteorder("<")
        for f in part["files"]:
            path, digest = part["path"] / f["file"], hashlib.sha256()
            with open(path, "rb") as fh:
                while chunk := fh.read(COPY_TOKENS * dtype.itemsize):
                    digest.update(chunk)
                    yield np.frombuffer(chunk, dtype=dtype)
            if digest.hexdigest() != f["sha256"]:
                raise ConfigError(f"part {str(part['path'])!r}: {f['file']} is corrupted (sha256 mismatch); "
                                  "run its slice again")
            if consume:
                path.unlink()


def cut(parts: list[dict], dest: Path, val_fraction: float, shard_tokens: int, consume: bool = False) -> dict:
    """Write the prepared dir of ``parts`` (checked by :func:`read_parts`) into ``dest``: shards,
    tokenizer and manifest; returns the manifest. ``consume`` deletes each part file once copied."""
    first = parts[0]
    documents = sum(p["documents"] for p in parts)
    if documents == 0:
        raise ConfigError(f"--source {first['source']!r} holds no documents")
    n_val = 0
    if val_fraction > 0 and documents >= 2:
        n_val = min(documents - 1, max(1, round(documents * val_fraction)))
    boundary = _cut_offset(parts, documents - n_val)
    dtype = np.dtype(first["dtype"]).newbyteorder("<")
    writers = {split: ShardWriter(dest, split, dtype, shard_tokens) for split in ("train", "val")}
    done = 0
    for chunk in _stream(parts, consume):
        head = chunk[:max(0, boundary - done)]
        writers["train"].write(head)
        writers["val"].write(chunk[len(head):])
        done += len(chunk)
    counts = {"train": (0, documents - n_val), "val": (documents - n_val, documents)}
    splits = {}
    for split, writer in writers.items():
        shards = writer.close()
        splits[split] = {"shards": shards, "tokens": sum(s["tokens"] for s in shards),
                         "documents": _nonempty(parts, *counts[split])}
    if splits["train"]["tokens"] == 0:
        raise ConfigError(f"--source {first['source']!r}: the corpus is empty (no text in the training documents)")
    if splits["val"]["tokens"] == 0:
        del splits["val"]
    shutil.copytree(first["path"] / "tokenizer", dest / "tokenizer")
    tokenizer = {k: first["tokenizer"][k] for k in ("kind", "spec")}
    repairs = {k: sum(p["repairs"][k] for p in parts) for k in first["repairs"]}
    manifest = {
        "format_version": FORMAT_VERSION,
        "tokenizer": {**tokenizer, "dir": "tokenizer", "sha256": fingerprint(dest / "tokenizer")},
        "vocab_size": first["vocab_size"],
        "eot_id": first["eot_id"],
        "dtype": first["dtype"],
        "splits": splits,
        "source": first["source"],
        "documents": documents,
        "repairs": repairs,
    }
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest
