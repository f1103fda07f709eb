"""Tokenize a source's units in N worker processes and hand back their tokens in order.

Processes, not threads: decoding, JSON parsing and collecting ids are Python and hold the
GIL, and the Rust tokenizer's own threads (``TOKENIZERS_PARALLELISM``) only parallelise
inside one ``encode_batch``. So each worker runs single-threaded (it sets
``TOKENIZERS_PARALLELISM=false``) and N workers use N cores. Workers are started with
``spawn``: the parent may hold Rust or torch threads, and forking a threaded process can
deadlock.

In order: results are taken in the order the units were read, whichever worker finishes
first, so the output is byte-identical for any N. Bounded: at most ``2 N`` units are in
flight (read but not yet written), so memory does not grow with the corpus.
"""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from itertools import chain, islice
from multiprocessing import get_context
from typing import Iterable, Iterator

import numpy as np

from bigtrain.data.tokenizer import HFTokenizer, Tokenizer, load_tokenizer
from bigtrain.data.units import Repairs, Unit, decode
from bigtrain.errors import ConfigError

IN_FLIGHT_PER_WORKER = 2  # enough to keep every worker busy while the main process writes


def default_workers() -> int:
    """Every core this process may run on (``os.sched_getaffinity``: SLURM's or taskset's share)."""
    return len(os.sched_getaffinity(0))


@dataclass
class Encoded:
    """A unit's documents as tokens: each non-empty document's ids then ``eot_id``, concatenated."""
    tokens: np.ndarray   # in the output dtype
    lengths: np.ndarray  # int64, tokens per document (0: an empty document adds nothing)
    repairs: tuple[int, int, int]


@dataclass(frozen=True)
class Job:
    """What a worker needs, picklable: the tokenizer as ``prepare`` saved it (a Hugging Face
    tokenizer is loaded from its own directory, ``spec``, as the main process loaded it)."""
    source: str
    strict: bool
    tokenizer_dir: str
    kind: str
    spec: str
    dtype: str

    def tokenizer(self) -> Tokenizer:
        return HFTokenizer(self.spec) if self.kind == "hf" else load_tokenizer(self.tokenizer_dir)


class Encoder:
    """One process's tokenizer, applied to one unit at a time."""

    def __init__(self, job: Job):
        self.job, self.tok, self.dtype = job, job.tokenizer(), np.dtype(job.dtype).newbyteorder("<")

    def __call__(self, unit: Unit) -> Encoded:
        repairs = Repairs(self.job.source, self.job.strict)
        texts = decode(unit, repairs)
        try:
            encoded = self.tok.encode_batch(texts)
        except Exception as e:  # `tokenizers` raises a bare Exception (e.g. a char outside a WordLevel vocab)
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(f"--source {self.job.source!r}: the tokenizer cannot encode it ({reason})") from None
        lengths = np.array([len(ids) + 1 if len(ids) else 0 for ids in encoded], dtype=np.int64)
        tokens = np.empty(int(lengths.sum()), dtype=self.dtype)
        end = 0
        for ids, n in zip(encoded, lengths):
            if n:
                tokens[end:end + n - 1] = ids
                tokens[end + n - 1] = self.tok.eot_id
                end += n
        return Encoded(tokens, lengths, repairs.counts())


_encoder: Encoder | None = None  # the worker process's own


def _start_worker(job: Job) -> None:
    global _encoder
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: N workers, N cores
    _encoder = Encoder(job)


def _encode(unit: Unit) -> Encoded:
    return _encoder(unit)


def encode_units(units: Iterable[Unit], job: Job, workers: int) -> Iterator[Encoded]:
    """``units`` tokenized, in their order, by ``workers`` processes (in this one when
    ``workers`` is 1 or there is a single unit: starting processes would cost more; there the
    Rust tokenizer's own threads follow TOKENIZERS_PARALLELISM, by default on)."""
    units = iter(units)
    head = list(islice(units, 2))
    if workers == 1 or len(head) < 2:
        yield from map(Encoder(job), chain(head, units))
        return
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_start_worker, initargs=(job,))
    pending = deque()
    try:
        for unit in chain(head, units):
            pending.append(pool.submit(_encode, unit))
            if len(pending) >= IN_FLIGHT_PER_WORKER * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
