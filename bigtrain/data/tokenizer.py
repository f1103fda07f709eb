"""Tokenizers: ``bytes``, ``char``, ``bpe:N`` and a Hugging Face tokenizer directory.

All four share one small interface (:class:`Tokenizer`) because the rest of bigtrain
only needs ids in, text out, a vocabulary size and the id that separates documents.

``save(dir)`` writes ``bigtrain_tokenizer.json`` (the kind and what is needed to
rebuild it) *and* Hugging Face files (``tokenizer.json`` + ``tokenizer_config.json``),
so every prepared data directory already holds a tokenizer that
``transformers.AutoTokenizer.from_pretrained`` loads and export can ship as is.
The HF files for bytes/char/bpe are written with the ``tokenizers`` library plus a
hand-written ``tokenizer_config.json``: importing ``transformers`` costs seconds,
and ``prepare`` should not pay that.

A literal ``<|endoftext|>`` inside a document is encoded as the separator by the
``bpe`` and Hugging Face tokenizers (that is how ``tokenizers`` treats special
tokens); ``bytes`` and ``char`` encode it as ordinary text.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as RustTokenizer

from bigtrain.errors import ConfigError

EOT = "<|endoftext|>"
META = "bigtrain_tokenizer.json"
SPEC_HELP = "expected bytes, char, bpe:<vocab size> or a Hugging Face tokenizer directory"


class Tokenizer:
    """The interface the trainer, ``prepare`` and ``inspect`` rely on."""
    kind: str
    spec: str
    vocab_size: int
    eot_id: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> Sequence[Sequence[int]]:
        """Many documents at once (what ``prepare`` calls): lists of ids, or integer numpy arrays
        where that is faster; the Rust-backed tokenizers override it to run in parallel."""
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        meta = {"kind": self.kind, "spec": self.spec, "vocab_size": self.vocab_size,
                "eot_id": self.eot_id, **self._meta()}
        (d / META).write_text(json.dumps(meta, ensure_ascii=False) + "\n")
        self.save_hf(d)

    def save_hf(self, directory: str | Path) -> bool:
        """Write files ``AutoTokenizer.from_pretrained(directory)`` loads; True if it did."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self._rust().save(str(d / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOT, "eos_token": EOT,
                  "clean_up_tokenization_spaces": False, "model_max_length": 10**30}
        (d / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")
        return True

    def _meta(self) -> dict:
        return {}

    def _rust(self) -> RustTokenizer:
        """A ``tokenizers`` equivalent of this tokenizer (what ``save_hf`` writes)."""
        raise NotImplementedError


def _with_eot(model: models.Model, eot_id: int) -> RustTokenizer:
    tok = RustTokenizer(model)
    tok.add_special_tokens([EOT])
    assert tok.token_to_id(EOT) == eot_id
    return tok


def _byte_symbols() -> list[str]:
    """The printable character byte-level BPE uses for each byte value (GPT-2's scheme):
    printable Latin-1 bytes stand for themselves, the rest are shifted above U+0100."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    symbols, shifted = [], 0
    for b in range(256):
        if b in printable:
            symbols.append(chr(b))
        else:
            symbols.append(chr(256 + shifted))
            shifted += 1
    return symbols


class BytesTokenizer(Tokenizer):
    """UTF-8 bytes 0..255 plus the separator 256: no training, nothing out of vocabulary."""
    kind = spec = "bytes"
    vocab_size = 257
    eot_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]  # no list of ints per byte

    def decode(self, ids: Iterable[int]) -> str:
        # Bytes accumulate until a separator or a foreign id, so multi-byte characters survive.
        out, run = [], bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                run.append(i)
                continue
            out.append(run.decode("utf-8", errors="replace"))
            out.append(EOT if i == self.eot_id else "\ufffd")
            run = bytearray()
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def _rust(self) -> RustTokenizer:
        # A BPE model with no merges over the 256 byte symbols is exactly "one id per byte".
        vocab = {s: b for b, s in enumerate(_byte_symbols())}
        tok = _with_eot(models.BPE(vocab=vocab, merges=[]), self.eot_id)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        return tok


class CharTokenizer(Tokenizer):
    """One id per character seen in the corpus (sorted, so the ids are reproducible), then the separator."""
    kind = spec = "char"

    def __init__(self, chars: Sequence[str]):
        self.chars = list(chars)
        self.index = {c: i for i, c in enumerate(self.chars)}
        self.eot_id = len(self.chars)
        self.vocab_size = len(self.chars) + 1

    @classmethod
    def train(cls, texts: Iterable[str]) -> "CharTokenizer":
        seen: set[str] = set()
        for t in texts:
            seen.update(t)
        return cls(sorted(seen))

    def encode(self, text: str) -> list[int]:
        try:
            return [self.index[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the char tokenizer's vocabulary") from None

    def decode(self, ids: Iterable[int]) -> str:
        n = len(self.chars)
        return "".join(self.chars[i] if 0 <= i < n else EOT if i == n else "\ufffd" for i in map(int, ids))

    def _meta(self) -> dict:
        return {"chars": self.chars}

    def _rust(self) -> RustTokenizer:
        tok = _with_eot(models.WordLevel(vocab=dict(self.index), unk_token=None), self.eot_id)
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        tok.decoder = decoders.Fuse()
        return tok


class BPETokenizer(Tokenizer):
    """``bpe:N``: byte-level BPE trained with ``tokenizers``; any text encodes, batches run in parallel."""
    kind = "bpe"

    def __init__(self, tok: RustTokenizer, spec: str):
        self.tok, self.spec = tok, spec
        self.vocab_size = tok.get_vocab_size()
        eot = tok.token_to_id(EOT)
        if eot is None:
            raise ConfigError(f"tokenizer {spec!r} has no {EOT} token")
        self.eot_id = eot

    @classmethod
    def train(cls, vocab: int, texts: Iterable[str], spec: str) -> "BPETokenizer":
        tok = RustTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOT], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok, spec)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # _fast: the same ids without character offsets, which nothing here needs
        return [e.ids for e in self.tok.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        ok = [i for i in map(int, ids) if 0 <= i < self.vocab_size]
        return self.tok.decode(ok, skip_special_tokens=False)

    def _rust(self) -> RustTokenizer:
        return self.tok


class HFTokenizer(Tokenizer):
    """A local Hugging Face tokenizer directory; its eos token separates documents."""
    kind = "hf"

    def __init__(self, directory: str, spec: str | None = None):
        from transformers import AutoTokenizer  # seconds to import: only when this kind is used
        try:
            self.tok = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ConfigError(f"--tokenizer {directory!r}: not a loadable Hugging Face tokenizer directory "
                              f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        if self.tok.eos_token_id is None:
            raise ConfigError(f"--tokenizer {directory!r}: the tokenizer has no eos token to separate documents")
        self.spec = spec or directory
        self.eot_id = int(self.tok.eos_token_id)
        self.vocab_size = len(self.tok)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False, verbose=False)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.tok(list(texts), add_special_tokens=False, verbose=False)["input_ids"]

    def decode(self, ids: Iterable[int]) -> str:
        ok = [i for i in map(int, ids) if 0 <= i < self.vocab_size]
        return self.tok.decode(ok, skip_special_tokens=False)

    def save_hf(self, directory: str | Path) -> bool:
        self.tok.save_pretrained(str(directory))
        return True


def check_spec(spec: str) -> None:
    """Reject a bad ``--tokenizer`` before any corpus is read."""
    if spec in ("bytes", "char") or Path(spec).is_dir():
        return
    if spec.startswith("bpe:"):
        n = spec[4:]
        if not n.isdigit():
            raise ConfigError(f"--tokenizer {spec!r}: the vocabulary size after 'bpe:' must be an integer")
        if int(n) < 257:
            raise ConfigError(f"--tokenizer {spec!r}: bpe vocabulary must be at least 257 (256 bytes + {EOT})")
        return
    raise ConfigError(f"--tokenizer {spec!r}: {SPEC_HELP}")


def build_tokenizer(spec: str, texts: Callable[[], Iterable[str]]) -> Tokenizer:
    """Make the tokenizer ``spec`` names; ``texts()`` streams the corpus for those that learn from it."""
    check_spec(spec)
    if spec == "bytes":
        return BytesTokenizer()
    if spec == "char":
        return CharTokenizer.train(texts())
    if spec.startswith("bpe:"):
        return BPETokenizer.train(int(spec[4:]), texts(), spec)
    return HFTokenizer(spec)


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Rebuild what :meth:`Tokenizer.save` wrote."""
    d = Path(directory)
    try:
        meta = json.loads((d / META).read_text())
        kind = meta["kind"]
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"tokenizer dir {str(d)!r}: {META} is missing or unreadable ({e})") from None
    if kind == "bytes":
        return BytesTokenizer()
    if kind == "char":
        return CharTokenizer(meta["chars"])
    if kind == "bpe":
        return BPETokenizer(RustTokenizer.from_file(str(d / "tokenizer.json")), meta["spec"])
    if kind == "hf":
        return HFTokenizer(str(d), spec=meta["spec"])
    raise ConfigError(f"tokenizer dir {str(d)!r}: unknown tokenizer kind {kind!r}")


def fingerprint(directory: str | Path) -> str:
    """sha256 of what a saved tokenizer's ids mean: its vocabulary, merges and added tokens
    (``tokenizer.json``), or ``bigtrain_tokenizer.json`` where there is none (a slow Hugging Face
    tokenizer). Not of the file as a whole: the same tokenizer saved again through ``transformers``
    (``prepare --tokenizer OTHER/tokenizer``) gains settings that change no id. Two prepared dirs
    share ids only when this agrees; vocabulary sizes can agree by chance (``char`` on two corpora
    with as many distinct characters)."""
    d = Path(directory)
    if not (d / "tokenizer.json").is_file():
        return hashlib.sha256((d / META).read_bytes()).hexdigest()
    saved = json.loads((d / "tokenizer.json").read_text())
    model = saved.get("model") or {}
    vocab = model.get("vocab") or {}
    ids = {
        "vocab": sorted(vocab.items()) if isinstance(vocab, dict) else vocab,  # Unigram: a list already
        "merges": [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []],  # both forms
        "added": sorted((t["id"], t["content"]) for t in saved.get("added_tokens") or []),
    }
    return hashlib.sha256(json.dumps(ids, ensure_ascii=False).encode()).hexdigest()
