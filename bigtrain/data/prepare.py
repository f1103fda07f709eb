"""``bigtrain prepare``: turn a corpus into token shards, once, on one machine or many.

Output (``OUT/``)::

    train-00000.bin ...  val-00000.bin ...   raw little-endian uint16 (vocab <= 65536) or uint32
    manifest.json                            tokenizer, dtype, token counts, sha256 of every shard
    tokenizer/                               bigtrain_tokenizer.json + Hugging Face tokenizer files

Every document is followed by the tokenizer's separator (``eot_id``), so documents
never run into each other, and a sample window that crosses a boundary shows it.
The held-out ``val`` split is the *last* ``val_fraction`` of documents (at least one
when there are two or more): splitting by document, not by token, keeps a document
from being half trained on and half evaluated.

How: the source (:mod:`bigtrain.data.sources`) is read as a stream of units of whole
documents (:mod:`bigtrain.data.units`), tokenized by ``workers`` processes and written in
order (:mod:`bigtrain.data.encode`) into one *part*, which is then cut into shards
(:mod:`bigtrain.data.parts`). Across machines, each SLURM array task writes the part of its
slice (:func:`prepare_slice`) and one merge cuts them all (:func:`merge`): the same cut, so
the same bytes as one machine. The output is the same for any number of workers or slices.
Workers are spawned processes: a script that calls :func:`prepare` needs the usual
``if __name__ == "__main__":`` guard, as with any ``multiprocessing`` code.

Nothing is written for bad input: arguments and the source are checked first, all
output goes to ``OUT.tmp``, which is renamed to ``OUT`` only when complete.
"""
from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from bigtrain.data.encode import Job, default_workers, encode_units
from bigtrain.data.parts import PartWriter, cut, read_part, read_parts
from bigtrain.data.sources import Source, open_source
from bigtrain.data.tokenizer import Tokenizer, build_tokenizer, check_spec, fingerprint
from bigtrain.data.units import Repairs
from bigtrain.errors import ConfigError

DEFAULT_VAL_FRACTION = 0.005
DEFAULT_SHARD_TOKENS = 2**27
TRAINED = ("char", "bpe:")  # tokenizer specs learnt from the corpus


def prepare(source: str, tokenizer: str, out: str, val_fraction: float = DEFAULT_VAL_FRACTION,
            shard_tokens: int = DEFAULT_SHARD_TOKENS, overwrite: bool = False, strict: bool = False,
            workers: int | None = None) -> dict:
    """Tokenize ``source`` with ``tokenizer`` into shards under ``out`` with ``workers`` processes
    (default: every core); returns the manifest. ``strict``: refuse a source that is not UTF-8
    or has rows without text, writing nothing."""
    _check_cut(val_fraction, shard_tokens)
    workers = _check_workers(workers)
    check_spec(tokenizer)
    src = open_source(source, strict)
    with _committed(Path(out), overwrite) as tmp:
        tok = build_tokenizer(tokenizer, src.texts)
        part = tmp / "part"
        part.mkdir()
        write_part(src, tok, part, 0, 1, workers)
        manifest = cut(read_parts([part]), tmp, val_fraction, shard_tokens, consume=True)
        shutil.rmtree(part)
    return manifest


def parts_dir(out: str | Path) -> Path:
    """Where the slices of ``out`` put their parts: ``OUT.parts/part-I-of-N``."""
    out = Path(out)
    return out.with_name(out.name + ".parts")


def prepare_slice(source: str, tokenizer: str, out: str, index: int, count: int, overwrite: bool = False,
                  strict: bool = False, workers: int | None = None) -> dict:
    """Tokenize slice ``index`` of ``count`` of ``source`` into its part under ``OUT.parts`` (one
    SLURM array task's share; :func:`merge` cuts the parts into ``out``). A part that this same
    slice already wrote is kept (a rerun array redoes only the slices that failed), unless
    ``overwrite``. Returns the part's part.json, with its ``path``."""
    if not 0 <= index < count:
        raise ConfigError(f"--slice {index}/{count}: expected I/N with 0 <= I < N")
    if tokenizer.startswith(TRAINED):
        raise ConfigError(f"--tokenizer {tokenizer!r} is learnt from the corpus, which one slice cannot see; "
                          "train it once (a one-machine prepare, of a sample if need be) and pass its "
                          "OUT/tokenizer dir to every slice")
    workers = _check_workers(workers)
    check_spec(tokenizer)
    src = open_source(source, strict)
    part = parts_dir(out) / f"part-{index:05d}-of-{count:05d}"
    start, stop = src.slice(index, count)
    if part.is_dir() and not overwrite:
        done, mine = read_part(part), {"source": src.name, "strict": src.strict, "slice": [index, count],
                                       "items": [start, stop], "items_sha256": src.fingerprint()}
        if {k: done[k] for k in mine} == mine and done["tokenizer"]["spec"] == tokenizer:
            return done
        raise ConfigError(f"--slice {index}/{count}: {str(part)!r} holds a part of another prepare; "
                          "pass --overwrite to replace it")
    with _committed(part, overwrite) as tmp:
        write_part(src, build_tokenizer(tokenizer, src.texts), tmp, index, count, workers)
    return read_part(part)


def merge(source: str, tokenizer: str, out: str, val_fraction: float = DEFAULT_VAL_FRACTION,
          shard_tokens: int = DEFAULT_SHARD_TOKENS, overwrite: bool = False) -> dict:
    """Cut the parts under ``OUT.parts`` (every slice's, :func:`prepare_slice`) into the prepared
    dir ``out``: the shards and manifest a one-machine :func:`prepare` of the same source and
    tokenizer writes. The parts are removed once ``out`` is complete."""
    _check_cut(val_fraction, shard_tokens)
    found = sorted(p for p in parts_dir(out).glob("part-*-of-*") if p.suffix != ".tmp")
    if not found:
        raise ConfigError(f"--merge: no parts in {str(parts_dir(out))!r}; run the `--slice I/N` steps first")
    parts = read_parts(found)
    for key, given in (("source", source), ("tokenizer", tokenizer)):
        recorded = parts[0][key]["spec"] if key == "tokenizer" else parts[0][key]
        if recorded != given:
            raise ConfigError(f"--merge: the parts in {str(parts_dir(out))!r} were made with --{key} {recorded!r}, "
                              f"not {given!r}")
    with _committed(Path(out), overwrite) as tmp:
        manifest = cut(parts, tmp, val_fraction, shard_tokens)
    shutil.rmtree(parts_dir(out))
    return manifest


def write_part(src: Source, tok: Tokenizer, part: Path, index: int, count: int, workers: int) -> dict:
    """Tokenize slice ``index`` of ``count`` of ``src`` with ``workers`` processes into the
    existing, empty dir ``part``; returns its part.json."""
    start, stop = src.slice(index, count)
    tok.save(part / "tokenizer")
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 2**16 else np.uint32).newbyteorder("<")
    job = Job(src.name, src.strict, str(part / "tokenizer"), tok.kind, tok.spec, dtype.name)
    writer, repairs = PartWriter(part, dtype), Repairs(src.name)
    for encoded in encode_units(src.units(start, stop), job, workers):
        writer.add(encoded.tokens, encoded.lengths)
        repairs.add(encoded.repairs)
    return writer.close({
        "source": src.name, "strict": src.strict, "slice": [index, count], "items": [start, stop],
        "items_total": len(src.items), "items_sha256": src.fingerprint(),
        "tokenizer": {"kind": tok.kind, "spec": tok.spec, "sha256": fingerprint(part / "tokenizer")},
        "vocab_size": tok.vocab_size, "eot_id": tok.eot_id, "dtype": dtype.name, "repairs": repairs.to_dict(),
    })


def _check_cut(val_fraction: float, shard_tokens: int) -> None:
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"val_fraction={val_fraction}: expected 0 <= val_fraction < 1")
    if shard_tokens < 1:
        raise ConfigError(f"shard_tokens={shard_tokens}: expected a positive number of tokens per shard")


def _check_workers(workers: int | None) -> int:
    if workers is None:
        return default_workers()
    if workers < 1:
        raise ConfigError(f"--workers {workers}: expected at least 1 process")
    return workers


@contextmanager
def _committed(out: Path, overwrite: bool):
    """A fresh ``OUT.tmp`` to write into, renamed to ``out`` only if the block completes."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"--out {str(out)!r} exists and is not empty; pass overwrite to replace it")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


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
