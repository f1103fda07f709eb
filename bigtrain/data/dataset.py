"""Read a prepared data directory: memory-mapped shards presented as one token stream per split.

A sample is a window of ``seq_len + 1`` tokens (inputs plus the shifted targets).
Sample ``i`` of a split is tokens ``[i*(seq_len+1), (i+1)*(seq_len+1))`` of the split's
concatenated shards: windows do not overlap and may cross shard boundaries, so the
number of samples depends only on the token count, not on how it was sharded.

``open_data`` checks everything it can before training starts (the manifest whole,
:mod:`bigtrain.data.manifest`; sizes; and by default every shard's sha256 and largest
token id, in one streamed read so nothing large is held in memory):
a corrupted or truncated shard should stop a run at launch, not hours into it.
"""
from __future__ import annotations

import hashlib
from functools import cached_property
from pathlib import Path
from typing import Sequence

import numpy as np

from bigtrain.config import ConfigError
from bigtrain.data.manifest import read_manifest, tokenizer_dir
from bigtrain.data.tokenizer import Tokenizer, fingerprint, load_tokenizer

HASH_CHUNK = 2**22


class TokenSplit:
    """Tokens ``[start, end)`` of the concatenation of some memory-mapped shards."""

    def __init__(self, shards: Sequence[np.ndarray], start: int = 0, end: int | None = None):
        self._shards = list(shards)
        sizes = [len(s) for s in self._shards]
        self._offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self.start = start
        self.end = int(self._offsets[-1]) if end is None else end

    @property
    def tokens(self) -> int:
        return self.end - self.start

    def read(self, offset: int, length: int) -> np.ndarray:
        """``length`` tokens from ``offset`` (relative to this split) as int64, across shards."""
        if offset < 0 or length < 0 or offset + length > self.tokens:
            raise IndexError(f"tokens [{offset}, {offset + length}) outside a split of {self.tokens} tokens")
        pos, stop = self.start + offset, self.start + offset + length
        parts = []
        k = int(np.searchsorted(self._offsets, pos, side="right")) - 1
        while pos < stop:
            base = int(self._offsets[k])
            take = min(stop, int(self._offsets[k + 1])) - pos
            parts.append(self._shards[k][pos - base: pos - base + take])
            pos += take
            k += 1
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    def num_samples(self, seq_len: int) -> int:
        return self.tokens // (seq_len + 1)

    def sample(self, i: int, seq_len: int) -> np.ndarray:
        if not 0 <= i < self.num_samples(seq_len):
            raise IndexError(f"sample {i} outside [0, {self.num_samples(seq_len)}) at seq_len={seq_len}")
        return self.read(i * (seq_len + 1), seq_len + 1)

    def batch(self, indices: Sequence[int], seq_len: int) -> np.ndarray:
        """Samples ``indices`` stacked into an int64 array ``[len(indices), seq_len + 1]``.

        One gather per shard, not a read per row: the loader's thread runs this while it holds
        the GIL the training step needs, and a row at a time cost about 15 us (a 512-row batch:
        8 ms). Only a window that crosses a shard boundary is read on its own."""
        idx, width, n = np.asarray(indices, dtype=np.int64).reshape(-1), seq_len + 1, self.num_samples(seq_len)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            bad = idx[(idx < 0) | (idx >= n)][0]
            raise IndexError(f"sample {bad} outside [0, {n}) at seq_len={seq_len}")
        starts = self.start + idx * width  # in the concatenated shards
        shard = np.searchsorted(self._offsets, starts, side="right") - 1
        inside = starts + width <= self._offsets[shard + 1]
        out = np.empty((len(idx), width), dtype=np.int64)
        for k in np.unique(shard[inside]).tolist():
            rows = np.flatnonzero(inside & (shard == k))
            out[rows] = self._shards[k][(starts[rows] - self._offsets[k])[:, None] + np.arange(width)]
        for row in np.flatnonzero(~inside).tolist():
            out[row] = self.read(int(idx[row]) * width, width)
        return out

    def tail(self, fraction: float) -> tuple["TokenSplit", "TokenSplit"]:
        """Split into (head, tail) where the tail holds the last ``fraction`` of the tokens.

        This is how a run holds out validation data when the prepared dir has no ``val``
        split (``data.val_fraction``). The cut is by token so that it does not depend on
        ``seq_len``; each part then counts its own samples from its own start.
        """
        if not 0 <= fraction < 1:
            raise ValueError(f"fraction={fraction}: expected 0 <= fraction < 1")
        cut = self.end - round(self.tokens * fraction)
        return TokenSplit(self._shards, self.start, cut), TokenSplit(self._shards, cut, self.end)


class MixedSplit:
    """The same split of several sources as one sample space (a mixture, :mod:`bigtrain.data.mixture`):
    sample ``offsets[s] + i`` is sample ``i`` of source ``s``. It reads like a :class:`TokenSplit`, so the
    loader, the culprit search, ``inspect`` and eval take either."""

    def __init__(self, names: Sequence[str], splits: Sequence[TokenSplit], data: Sequence["PreparedData"] = ()):
        self.names, self.splits, self.data = list(names), list(splits), list(data)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.splits)

    def sizes(self, seq_len: int) -> list[int]:
        return [s.num_samples(seq_len) for s in self.splits]

    def offsets(self, seq_len: int) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.sizes(seq_len))]).astype(np.int64)

    def num_samples(self, seq_len: int) -> int:
        return sum(self.sizes(seq_len))

    def sample(self, i: int, seq_len: int) -> np.ndarray:
        return self.batch([i], seq_len)[0]

    def batch(self, indices: Sequence[int], seq_len: int) -> np.ndarray:
        offsets, idx = self.offsets(seq_len), np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= offsets[-1]):
            raise IndexError(f"a sample outside [0, {offsets[-1]}) at seq_len={seq_len}")
        source = np.searchsorted(offsets, idx, side="right") - 1
        out = np.empty((len(idx), seq_len + 1), dtype=np.int64)
        for s in np.unique(source).tolist():
            rows = np.flatnonzero(source == s)
            out[rows] = self.splits[s].batch(idx[rows] - offsets[s], seq_len)
        return out


class PreparedData:
    """A directory written by :func:`bigtrain.data.prepare.prepare`, opened and checked."""

    def __init__(self, path: Path, manifest: dict, splits: dict[str, TokenSplit]):
        self.path, self.manifest, self._splits = path, manifest, splits
        self.vocab_size: int = int(manifest["vocab_size"])
        self.eot_id: int = int(manifest["eot_id"])

    @property
    def split_names(self) -> list[str]:
        return list(self._splits)

    def has_split(self, name: str) -> bool:
        return name in self._splits

    def split(self, name: str) -> TokenSplit:
        if name not in self._splits:
            raise ConfigError(f"data dir {str(self.path)!r} has no {name!r} split (it has: {', '.join(self._splits)})")
        return self._splits[name]

    @cached_property
    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(tokenizer_dir(self.path, self.manifest))

    @cached_property
    def tokenizer_id(self) -> str:
        """What the token ids mean: the tokenizer's sha256 (recorded by prepare, else computed)."""
        return self.manifest["tokenizer"].get("sha256") or fingerprint(tokenizer_dir(self.path, self.manifest))


def _scan(path: Path, dtype: np.dtype) -> tuple[str, int]:
    """(sha256, largest token id) of a shard in one streamed read: the id check rides on the hash."""
    h, top = hashlib.sha256(), -1
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):  # HASH_CHUNK is a multiple of every dtype's size
            h.update(chunk)
            top = max(top, int(np.frombuffer(chunk, dtype=dtype).max()))
    return h.hexdigest(), top


def _open_shard(root: Path, shard: dict, dtype: np.dtype, vocab: int, verify: bool) -> np.ndarray:
    path = root / shard["file"]
    if not path.is_file():
        raise ConfigError(f"data dir {str(root)!r}: shard {shard['file']} is missing")
    expected = shard["tokens"] * dtype.itemsize
    size = path.stat().st_size
    if size != expected:
        raise ConfigError(f"data dir {str(root)!r}: shard {shard['file']} has {size} bytes, expected {expected} "
                          f"({shard['tokens']} {dtype.name} tokens); it is truncated or corrupted")
    if verify:
        digest, top = _scan(path, dtype)
        if digest != shard["sha256"]:
            raise ConfigError(f"data dir {str(root)!r}: shard {shard['file']} is corrupted (sha256 mismatch); "
                              "prepare the data again")
        if top >= vocab:
            raise ConfigError(f"data dir {str(root)!r}: shard {shard['file']} holds token id {top}, outside the "
                              f"manifest's vocab_size {vocab}; the manifest does not belong to these shards")
    return np.memmap(path, dtype=dtype, mode="r")


def _check_tokenizer(root: Path, manifest: dict) -> None:
    """The tokenizer dir must be the one the shards were made with (its sha256 is in the manifest
    of every dir prepared since it was recorded; older dirs are taken as they are)."""
    recorded = manifest["tokenizer"].get("sha256")
    if recorded is not None and fingerprint(tokenizer_dir(root, manifest)) != recorded:
        raise ConfigError(f"data dir {str(root)!r}: its tokenizer dir is not the tokenizer the shards were "
                          "made with (sha256 differs from the manifest); prepare the data again")


def open_data(path: str, verify: bool = True) -> PreparedData:
    """Open a prepared dir; ``verify`` re-hashes every shard (seconds per GB) to catch silent corruption."""
    root = Path(path)
    manifest = read_manifest(root)
    if verify:
        _check_tokenizer(root, manifest)
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")  # prepare writes little-endian
    splits = {}
    for name, info in manifest["splits"].items():
        shards = [_open_shard(root, s, dtype, manifest["vocab_size"], verify) for s in info["shards"] if s["tokens"]]
        splits[name] = TokenSplit(shards)
    return PreparedData(root, manifest, splits)
