"""``bigtrain prepare``: turn a corpus into token shards, once.

Output (``OUT/``)::

    train-00000.bin ...  val-00000.bin ...   raw little-endian uint16 (vocab <= 65536) or uint32
    manifest.json                            tokenizer, dtype, token counts, sha256 of every shard
    tokenizer/                               bigtrain_tokenizer.json + Hugging Face tokenizer files

Every document is followed by the tokenizer's separator (``eot_id``), so documents
never run into each other, and a sample window that crosses a boundary shows it.
The held-out ``val`` split is the *last* ``val_fraction`` of documents (at least one
when there are two or more): splitting by document, not by token, keeps a document
from being half trained on and half evaluated.

Nothing is written for bad input: arguments and the source are checked first, all
output goes to ``OUT.tmp``, which is renamed to ``OUT`` only when complete.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import sysconfig
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from bigtrain.config import ConfigError
from bigtrain.data.manifest import FORMAT_VERSION
from bigtrain.data.tokenizer import Tokenizer, build_tokenizer, check_spec, fingerprint

REPLACEMENT = "\ufffd"
# The stdlib corpus: the standard library's .py files in sorted path order, up to this much
# text. At 16 MiB it is the whole library on CPython 3.11 (~11 MB, ~670 files) and a
# deterministic prefix on versions with a larger one; `prepare` with `bytes` takes seconds.
STDLIB_MAX_BYTES = 16 * 2**20
STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}
DATA_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
ENCODE_BATCH_CHARS = 8 * 2**20  # text handed to the tokenizer at once: parallel, yet bounded memory


@dataclass
class Repairs:
    """What reading the source changed: bytes that are not UTF-8 become U+FFFD, a row without
    text becomes an empty document (nothing written). Counted per pass over the source (the
    last, the one that writes the shards, is what the manifest records); ``strict`` refuses the
    first one instead, naming it."""
    source: str
    strict: bool = False
    replaced_chars: int = 0
    replaced_docs: int = 0
    dropped_rows: int = 0

    def start(self) -> None:
        self.replaced_chars = self.replaced_docs = self.dropped_rows = 0

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

    def _refuse(self, problem: str) -> None:
        if self.strict:
            raise ConfigError(f"--source {self.source!r}: {problem}; --strict refuses it, nothing was written")

    def to_dict(self) -> dict:
        return {"replaced_chars": self.replaced_chars, "replaced_docs": self.replaced_docs,
                "dropped_rows": self.dropped_rows}


@dataclass
class Corpus:
    """An ordered, re-iterable sequence of documents whose count is known up front."""
    count: int
    texts: Callable[[], Iterator[str]]
    repairs: Repairs


def _text_files(paths: list[str], repairs: Repairs) -> Corpus:
    def texts() -> Iterator[str]:
        repairs.start()
        for p in paths:
            yield repairs.decode(Path(p).read_bytes(), p)
    return Corpus(len(paths), texts, repairs)


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


def _dataset_corpus(ds, source: str, repairs: Repairs) -> Corpus:
    if "text" not in ds.column_names:
        raise ConfigError(f"--source {source!r}: no 'text' column (columns: {', '.join(ds.column_names)})")
    ds = ds.select_columns(["text"])

    def texts() -> Iterator[str]:
        repairs.start()
        row = 0
        for batch in ds.iter(batch_size=1024):
            for t in batch["text"]:
                if t is not None and not isinstance(t, str):
                    raise ConfigError(f"--source {source!r}: 'text' holds {type(t).__name__}, expected strings")
                yield repairs.drop(f"row {row} (from 0)") if t is None else t
                row += 1
    return Corpus(len(ds), texts, repairs)


def _saved_dataset(path: str, source: str, repairs: Repairs) -> Corpus:
    import datasets
    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds and len(ds) != 1:
            raise ConfigError(f"--source {source!r}: a DatasetDict without a 'train' split ({', '.join(ds)})")
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    return _dataset_corpus(ds, source, repairs)


def _data_files(files: list[str], fmt: str, source: str, cache: str, repairs: Repairs) -> Corpus:
    import datasets
    datasets.disable_progress_bars()  # bars on stderr would bury prepare's one line (or its one-line error)
    try:
        ds = datasets.load_dataset(fmt, data_files=files, split="train", cache_dir=cache)
    except Exception as e:  # datasets raises many kinds; all mean "this file is not what it claims"
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"--source {source!r}: cannot read the files as {fmt} ({reason})") from None
    return _dataset_corpus(ds, source, repairs)


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file())


def open_source(source: str, cache: str, strict: bool = False) -> Corpus:
    """The documents ``--source`` names; ``cache`` is a scratch dir for ``datasets``;
    ``strict`` refuses undecodable bytes and rows without text (:class:`Repairs`)."""
    repairs = Repairs(source, strict)
    if source == "stdlib":
        return _text_files(_stdlib_files(), repairs)
    if source.startswith("hf:"):
        path = Path(source[3:])
        if not _is_saved_dataset(path):
            raise ConfigError(f"--source {source!r}: no local dataset saved with save_to_disk at {str(path)!r}; "
                              "prepare does no network download, so pass a local path instead")
        return _saved_dataset(str(path), source, repairs)
    if _is_saved_dataset(Path(source)):
        return _saved_dataset(source, source, repairs)
    if Path(source).is_dir():
        raise ConfigError(f"--source {source!r} is a directory; pass a glob such as '{source}/**/*.txt'")
    if Path(source).is_file():
        files = [source]
    elif glob.has_magic(source):
        files = sorted(p for p in glob.glob(source, recursive=True) if Path(p).is_file())
    else:
        files = []
    if not files:
        raise ConfigError(f"--source {source!r} matches no files")
    formats = {DATA_FORMATS.get(Path(f).suffix.lower(), "text") for f in files}
    if len(formats) > 1:
        raise ConfigError(f"--source {source!r} mixes file kinds ({', '.join(sorted(formats))}); use one kind")
    fmt = formats.pop()
    return _text_files(files, repairs) if fmt == "text" else _data_files(files, fmt, source, cache, repairs)


class ShardWriter:
    """Appends tokens to ``SPLIT-NNNNN.bin`` files of ``shard_tokens`` each, hashing as it writes."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self.documents = 0
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

    def close(self) -> dict:
        if self._file is not None:
            self._finish()
        return {"shards": self.shards, "tokens": sum(s["tokens"] for s in self.shards), "documents": self.documents}


def _encode_into(corpus: Corpus, tok: Tokenizer, writers: list[ShardWriter], n_train: int) -> None:
    """Stream documents through the tokenizer in batches; documents ``>= n_train`` go to ``writers[1]``."""
    batch: list[str] = []
    size = index = 0

    def flush() -> None:
        nonlocal index
        try:
            encoded = tok.encode_batch(batch)
        except Exception as e:  # `tokenizers` raises a bare Exception (e.g. a char outside a WordLevel vocab)
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(f"--source {corpus.repairs.source!r}: the tokenizer cannot encode it "
                              f"({reason})") from None
        for ids in encoded:
            writer = writers[0] if index < n_train else writers[1]
            index += 1
            if ids:  # an empty document adds nothing, not even a separator
                writer.write(np.append(np.asarray(ids, dtype=np.int64), tok.eot_id))
                writer.documents += 1
        batch.clear()

    for text in corpus.texts():
        batch.append(text)
        size += len(text)
        if size >= ENCODE_BATCH_CHARS:
            flush()
            size = 0
    flush()


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"--out {str(out)!r} exists and is not empty; pass overwrite to replace it")


def prepare(source: str, tokenizer: str, out: str, val_fraction: float = 0.005,
            shard_tokens: int = 2**27, overwrite: bool = False, strict: bool = False) -> dict:
    """Tokenize ``source`` with ``tokenizer`` into shards under ``out``; returns the manifest.
    ``strict``: refuse a source that is not UTF-8 or has rows without text, writing nothing."""
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"val_fraction={val_fraction}: expected 0 <= val_fraction < 1")
    if shard_tokens < 1:
        raise ConfigError(f"shard_tokens={shard_tokens}: expected a positive number of tokens per shard")
    check_spec(tokenizer)
    out_path = Path(out)
    _check_out(out_path, overwrite)
    tmp = out_path.with_name(out_path.name + ".tmp")
    with tempfile.TemporaryDirectory(prefix="bigtrain-prepare-") as cache:
        corpus = open_source(source, cache, strict)
        if corpus.count == 0:
            raise ConfigError(f"--source {source!r} holds no documents")
        tok = build_tokenizer(tokenizer, corpus.texts)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            manifest = _write(tmp, source, corpus, tok, val_fraction, shard_tokens)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if out_path.exists():
        shutil.rmtree(out_path)
    tmp.rename(out_path)
    return manifest


def _write(tmp: Path, source: str, corpus: Corpus, tok: Tokenizer, val_fraction: float, shard_tokens: int) -> dict:
    n_val = 0
    if val_fraction > 0 and corpus.count >= 2:
        n_val = min(corpus.count - 1, max(1, round(corpus.count * val_fraction)))
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 2**16 else np.uint32).newbyteorder("<")
    writers = [ShardWriter(tmp, split, dtype, shard_tokens) for split in ("train", "val")]
    _encode_into(corpus, tok, writers, corpus.count - n_val)
    splits = {w.split: w.close() for w in writers}
    if splits["train"]["tokens"] == 0:
        raise ConfigError(f"--source {source!r}: the corpus is empty (no text in the training documents)")
    if splits["val"]["tokens"] == 0:
        del splits["val"]
    tok.save(tmp / "tokenizer")
    manifest = {
        "format_version": FORMAT_VERSION,
        "tokenizer": {"kind": tok.kind, "spec": tok.spec, "dir": "tokenizer",
                      "sha256": fingerprint(tmp / "tokenizer")},
        "vocab_size": tok.vocab_size,
        "eot_id": tok.eot_id,
        "dtype": dtype.name,
        "splits": splits,
        "source": source,
        "documents": corpus.count,
        "repairs": corpus.repairs.to_dict(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def summary(out: str, manifest: dict) -> str:
    """``prepare``'s one-line report, with what reading the source changed, if anything."""
    splits = ", ".join(f"{k}: {v['tokens']:,} tokens" for k, v in manifest["splits"].items())
    line = f"prepared {out} (vocab {manifest['vocab_size']}, {manifest['dtype']}; {splits})"
    r = manifest["repairs"]
    changed = []
    if r["replaced_docs"]:
        changed.append(f"{r['replaced_docs']:,} documents not valid UTF-8 ({r['replaced_chars']:,} byte sequences "
                       "replaced with U+FFFD)")
    if r["dropped_rows"]:
        changed.append(f"{r['dropped_rows']:,} rows without text dropped")
    return line + (f"; WARNING: {', '.join(changed)}; --strict refuses such a source" if changed else "")
