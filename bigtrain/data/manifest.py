"""The manifest of a prepared data directory, checked whole before any shard is opened.

``manifest.json`` is what a run believes about its data: which files hold the tokens,
how many, in which dtype, for which vocabulary. A hand-edited or mis-copied manifest
would not crash: it would train on the wrong data (a shard listed twice is read twice
per epoch; a vocabulary the dtype cannot hold wraps ids around). So every field the
reader relies on is checked here, and each problem is one :class:`ConfigError` line.

What needs the shards' bytes (sizes, sha256, the largest token id) is checked by
:mod:`bigtrain.data.dataset` as it opens them.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from bigtrain.errors import ConfigError
from bigtrain.data.tokenizer import META

FORMAT_VERSION = 1
DTYPE_IDS = {"uint16": 2**16, "uint32": 2**32}  # the dtypes prepare writes, and how many ids each holds
REQUIRED = ("vocab_size", "eot_id", "dtype", "splits", "tokenizer")
SHA256 = re.compile(r"[0-9a-f]{64}")


def read_manifest(root: Path) -> dict:
    """The manifest of the prepared dir ``root``, every field checked (one line per problem)."""
    if not root.is_dir():
        raise ConfigError(f"data dir {str(root)!r} not found; create it with `bigtrain prepare --out {root}`")
    try:
        manifest = json.loads((root / "manifest.json").read_text())
    except FileNotFoundError:
        raise ConfigError(f"data dir {str(root)!r} has no manifest.json; is it a `bigtrain prepare` output?") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"data dir {str(root)!r}: manifest.json is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise ConfigError(f"data dir {str(root)!r}: manifest format_version {version!r}, expected {FORMAT_VERSION}")
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise ConfigError(f"data dir {str(root)!r}: manifest.json lacks {', '.join(missing)}")
    problem = _vocabulary(manifest) or _splits(manifest["splits"]) or _tokenizer(root, manifest["tokenizer"])
    if problem:
        raise ConfigError(f"data dir {str(root)!r}: {problem}")
    return manifest


def tokenizer_dir(root: Path, manifest: dict) -> Path:
    return root / manifest["tokenizer"].get("dir", "tokenizer")


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _plain_name(value) -> bool:
    """A file name inside the data dir: no path that could point at another dir's files."""
    return isinstance(value, str) and value not in ("", ".", "..") and Path(value).name == value


def _vocabulary(m: dict) -> str | None:
    vocab, eot, dtype = m["vocab_size"], m["eot_id"], m["dtype"]
    if not _count(vocab) or vocab < 2:
        return f"manifest vocab_size {vocab!r} is not an integer >= 2"
    if not _count(eot) or eot >= vocab:
        return f"manifest eot_id {eot!r} is outside the vocabulary [0, {vocab})"
    if dtype not in DTYPE_IDS:
        return f"manifest dtype {dtype!r} is not one of {', '.join(DTYPE_IDS)}"
    if vocab > DTYPE_IDS[dtype]:
        return f"manifest dtype {dtype} cannot hold vocab_size {vocab} (ids up to {vocab - 1}); prepare the data again"
    return None


def _splits(splits) -> str | None:
    if not isinstance(splits, dict) or "train" not in splits:
        return "manifest splits has no 'train' split"
    seen: set[str] = set()
    for name, info in splits.items():
        if not isinstance(info, dict) or not isinstance(info.get("shards"), list):
            return f"manifest split {name!r} has no list of shards"
        for shard in info["shards"]:
            file = shard.get("file") if isinstance(shard, dict) else None
            if not _plain_name(file):
                return f"manifest split {name!r} names shard {file!r}, not a file name inside the data dir"
            if file in seen:
                return f"manifest lists shard {file} twice (its samples would be read twice per epoch)"
            seen.add(file)
            if not _count(shard.get("tokens")):
                return f"manifest shard {file}: token count {shard.get('tokens')!r} is not an integer >= 0"
            if not isinstance(shard.get("sha256"), str) or not SHA256.fullmatch(shard["sha256"]):
                return f"manifest shard {file}: sha256 {shard.get('sha256')!r} is not a hex digest"
        total = sum(s["tokens"] for s in info["shards"])
        if "tokens" in info and info["tokens"] != total:
            return f"manifest split {name!r} says {info['tokens']!r} tokens, its shards hold {total}"
    return None


def _tokenizer(root: Path, tokenizer) -> str | None:
    """A prepared dir must carry its tokenizer: ``inspect`` decodes with it and ``export`` ships it,
    so a run whose data lost it would only find out after training. Refused at start instead."""
    if not isinstance(tokenizer, dict) or not _plain_name(tokenizer.get("dir", "tokenizer")):
        return f"manifest tokenizer {tokenizer!r} does not name a tokenizer dir inside the data dir"
    if not (root / tokenizer.get("dir", "tokenizer") / META).is_file():
        return (f"its tokenizer ({tokenizer.get('dir', 'tokenizer')}/{META}) is missing, so `bigtrain export` and "
                "`inspect` could not use a run on it; restore the dir or prepare the data again")
    return None
