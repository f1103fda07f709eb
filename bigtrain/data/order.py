"""The global sample order: the one place that decides which sample every step reads.

* The data is ``N`` samples. Epoch ``e`` visits them in ``permutation(N, seed, e)``, and the
  epochs concatenate into one infinite stream: stream position ``p`` holds sample
  ``permutation(N, seed, p // N)[p % N]``.
* The trainer's data position is a stream position, saved in every checkpoint.
* A global batch of size ``B`` is the next ``B`` stream positions not covered by the
  *skip ledger*: sorted half-open ranges ``[start, end)`` of positions never to be read
  (the data windows a stability rollback stepped over).
* Rank ``r`` of ``W`` takes columns ``r::W`` of the global batch.
* A mixture of sources (``data.sources``) keeps all of this: position ``p`` is the ``k``-th
  draw from one source, decided in closed form by the weights (:mod:`bigtrain.data.mixture`),
  and reads sample ``permutation(N_s, seed, k // N_s)[k % N_s]`` of that source: each
  source its own epochs. Sample ids number the sources' samples one source after another.

So a batch depends only on (seed, position, ledger, B): never on the world size, the
micro-batch size or the number of loader workers. A run resumed on another world size
sees the same batches, and ``bigtrain inspect`` can say exactly what step N trained on.

What a saved position *means* depends on the seed, the samples (the training
shards, cut into ``seq_len + 1`` tokens, minus a ``data.val_fraction`` tail) and
their number. A checkpoint stores that *fingerprint* with the skip ledger
(:meth:`SampleOrder.state_dict`), and a resume that would silently continue at the
same position of another stream is refused unless ``checkpoint.accept_data_change``.
A mixture's fingerprint is per source; a resume with other weights, or with sources added
after the saved ones, is intended (an annealing stage): it starts a new segment of the
weight history at the resumed position, which the state saves and the ledger records.

The permutation is a keyed bijection computed per index, not a shuffled array: a
4-round Feistel network over ``2**k >= N`` with cycle walking (an index that lands
outside ``[0, N)`` is encrypted again until it lands inside; this stays a bijection on
``[0, N)``). That costs O(1) memory for any ``N``, so a trillion-sample stream needs
no index file, and it is built only from blake2b and 64-bit integer arithmetic
written out here, so the order can never change under us with a numpy RNG upgrade.
"""
from __future__ import annotations

import bisect
import copy
import functools
import hashlib
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import numpy as np

from bigtrain.config import BatchConfig, ConfigError
from bigtrain.data.dataset import MixedSplit
from bigtrain.data.mixture import Mixture, integer_weights

if TYPE_CHECKING:
    from bigtrain.config import Config
    from bigtrain.data.dataset import PreparedData, TokenSplit

_ROUNDS = 4
_M1_INT, _M2_INT = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB  # splitmix64's multipliers
_M1, _M2 = np.uint64(_M1_INT), np.uint64(_M2_INT)
_MASK64 = (1 << 64) - 1
# Up to this many scattered indices, :func:`permute` walks each one on Python ints: on arrays this
# small numpy's cost per call, about 40 calls a round, is most of the work (12 indices: 0.24 ms in
# numpy, 0.04 ms on ints). The two give the same numbers (tests/test_order.py).
_SMALL = 32
# A step's batch is consecutive stream positions, so its indices mostly fall in one aligned block of
# this many: :func:`permute` computes such a block whole, in numpy (0.3-2.7 ms), and keeps the last
# few, so the next few hundred steps only look their samples up (12 indices: 0.16 -> 0.02 ms). Why
# it matters: the loader's thread computes the order holding the GIL the training step waits for.
_BLOCK = 4096


def _round_keys(seed: int, epoch: int) -> np.ndarray:
    digest = hashlib.blake2b(f"bigtrain-order:{seed}:{epoch}".encode(), digest_size=8 * _ROUNDS).digest()
    return np.frombuffer(digest, dtype="<u8").astype(np.uint64)


def _mix(x: np.ndarray, key: np.uint64) -> np.ndarray:
    """A 64-bit avalanche hash of ``x ^ key`` (the splitmix64 finalizer): the Feistel round function."""
    z = x ^ key
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def _feistel(x: np.ndarray, keys: np.ndarray, half: int) -> np.ndarray:
    """A bijection on ``[0, 2**(2*half))``: ``half`` is the width of each of the two halves."""
    shift, mask = np.uint64(half), np.uint64((1 << half) - 1)
    left, right = x >> shift, x & mask
    for key in keys:
        left, right = right, left ^ (_mix(right, key) & mask)
    return (left << shift) | right


def _walk_int(x: int, keys: list[int], half: int, n: int) -> int:
    """:func:`_feistel` and its cycle walk for one index, on Python ints (what numpy's uint64
    arithmetic computes: products modulo 2**64)."""
    mask = (1 << half) - 1
    while True:
        left, right = x >> half, x & mask
        for key in keys:
            z = right ^ key
            z = ((z ^ (z >> 30)) * _M1_INT) & _MASK64
            z = ((z ^ (z >> 27)) * _M2_INT) & _MASK64
            left, right = right, left ^ ((z ^ (z >> 31)) & mask)
        x = (left << half) | right
        if x < n:
            return x


def permute(n: int, seed: int, epoch: int, index: np.ndarray) -> np.ndarray:
    """``permutation(n, seed, epoch)[index]`` without materializing the permutation."""
    if n < 1:
        raise ValueError(f"cannot permute {n} samples")
    idx = np.asarray(index, dtype=np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise IndexError(f"index outside [0, {n})")
    block_of = idx // _BLOCK
    blocks = np.unique(block_of)
    if idx.size < _BLOCK and idx.size >= 4 * blocks.size:  # mostly consecutive: look them up in cached blocks
        out = np.empty(idx.shape, dtype=np.int64)
        for block in blocks.tolist():
            where = block_of == block
            out[where] = _permuted_block(n, seed, epoch, block)[idx[where] - block * _BLOCK]
        return out
    return _encrypt(n, seed, epoch, idx)


@functools.lru_cache(maxsize=4)
def _permuted_block(n: int, seed: int, epoch: int, block: int) -> np.ndarray:
    """``permutation(n, seed, epoch)[block * _BLOCK:(block + 1) * _BLOCK]``, read-only (it is shared)."""
    out = _encrypt(n, seed, epoch, np.arange(block * _BLOCK, min(n, (block + 1) * _BLOCK), dtype=np.int64))
    out.flags.writeable = False
    return out


def _encrypt(n: int, seed: int, epoch: int, idx: np.ndarray) -> np.ndarray:
    """:func:`permute` computed index by index: the Feistel network and its cycle walk."""
    bits = max(2, (n - 1).bit_length())
    half = (bits + 1) // 2  # balanced halves: the domain 2**(2*half) is under 4n, so walks are short
    keys = _round_keys(seed, epoch)
    if idx.size <= _SMALL:
        keys = [int(k) for k in keys]
        return np.array([_walk_int(int(i), keys, half, n) for i in idx.ravel()], dtype=np.int64).reshape(idx.shape)
    out = _feistel(idx.astype(np.uint64), keys, half)
    todo = np.flatnonzero(out >= np.uint64(n))
    while todo.size:
        out[todo] = _feistel(out[todo], keys, half)
        todo = todo[out[todo] >= np.uint64(n)]
    return out.astype(np.int64)


def permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The whole order of epoch ``epoch`` (O(n) memory: for tests and inspection)."""
    return permute(n, seed, epoch, np.arange(n))


# What defines the order, in the order a mismatch is reported, with the name a user knows it by:
# the run's, then each source's (one-source runs keep these flat, as they always did).
FINGERPRINT = (("seed", "seed"), ("seq_len", "model.seq_len"))
SOURCE_FINGERPRINT = (("train_sha256", "train shards sha256"), ("val_fraction", "data.val_fraction"),
                      ("samples", "training samples"))


def _sources(fingerprint: dict) -> list[dict]:
    """A fingerprint's per-source entries (a flat one-source fingerprint is one source)."""
    return fingerprint["sources"] if "sources" in fingerprint else [fingerprint]


def _shown(key: str, value):
    if key == "train_sha256" and value:  # enough hex digits to tell two corpora apart
        return f"{value[:12]}..."
    return value


class SampleOrder:
    """The infinite sample stream of one run and its skip ledger.

    With several sources (``num_samples`` a list: each source's sample count) the samples
    are numbered source after source (source ``s`` holds ids ``[offsets[s], offsets[s+1])``)
    and :mod:`bigtrain.data.mixture` decides which source each position draws from."""

    def __init__(self, num_samples: int | Sequence[int], seed: int, skip: Iterable[tuple[int, int]] = (),
                 fingerprint: dict | None = None, accept_change: bool = False,
                 weights: Sequence[float] | None = None, position: Callable[[], int] | None = None):
        """``fingerprint``: what else defines the samples (see :func:`run_order`);
        ``accept_change``: load a saved state whose fingerprint differs; ``weights``: the
        mixture's (default: equal); ``position``: the run's data position, read when a
        loaded state's weights differ from ``weights`` (the new weights start there)."""
        sizes = [int(num_samples)] if isinstance(num_samples, (int, np.integer)) else [int(n) for n in num_samples]
        if min(sizes, default=0) < 1:
            raise ConfigError("the data holds no sample of seq_len + 1 tokens; use more data or a shorter seq_len")
        self.sizes, self.seed = sizes, int(seed)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.num_samples = int(self.offsets[-1])
        self.fingerprint = {**(fingerprint or {}), "seed": self.seed}
        if "sources" not in self.fingerprint:
            self.fingerprint["samples"] = self.num_samples
        self.accept_change, self.position = accept_change, position
        self.weights = integer_weights(weights or [1.0] * len(sizes))  # what this run reads from now on
        self.mixture = Mixture(self.weights)
        self.on_change: Callable[[dict], None] | None = None  # told about every new mixture segment
        self._starts: list[int] = []
        self._ends: list[int] = []
        for start, end in skip:
            self.add_skip(start, end)

    def state_dict(self) -> dict:
        """The skip ledger, the fingerprint and (mixtures) the weight history, as plain data
        (the position is the trainer's)."""
        state = {"skips": [[s, e] for s, e in self.skips], "fingerprint": dict(self.fingerprint)}
        if "sources" in self.fingerprint:
            state["mixture"] = self.mixture.history()
        return state

    def difference(self, saved: dict) -> str | None:
        """What makes the saved fingerprint another stream than ours (one line), or None.
        New sources after the saved ones and other weights are no difference: they start a segment."""
        for key, label in FINGERPRINT:
            if saved.get(key) != self.fingerprint.get(key):
                return f"{label} {saved.get(key)}, this run has {label} {self.fingerprint.get(key)}"
        theirs, ours = _sources(saved), _sources(self.fingerprint)
        if len(ours) < len(theirs):
            return (f"{len(theirs)} data sources, this run has {len(ours)} (a source cannot be removed "
                    "mid-run: keep it in data.sources with weight 0)")
        flat = "sources" not in saved and "sources" not in self.fingerprint
        for i, (a, b) in enumerate(zip(theirs, ours)):
            where = "" if flat else f" for data.sources[{i}] ({a.get('name')!r})"
            for key, label in SOURCE_FINGERPRINT:
                if a.get(key) != b.get(key):
                    return (f"{label} {_shown(key, a.get(key))}{where}, "
                            f"this run has {label} {_shown(key, b.get(key))}")
        return None

    def load_state_dict(self, state: dict) -> None:
        """Take the saved ledger and weight history, after checking that the saved order is this one.

        Raises :class:`ConfigError` naming the first thing that changed, unless
        ``accept_change`` (then the history restarts with this run's weights). Other weights,
        or sources added after the saved ones, are intended: a new mixture segment starts at
        the run's position and ``on_change`` is told."""
        why = self.difference(state["fingerprint"])
        if why and not self.accept_change:
            raise ConfigError(f"the data order was written with {why}; "
                              "set checkpoint.accept_data_change=true if that is intended")
        self._starts, self._ends = [], []
        for start, end in state["skips"]:
            self.add_skip(start, end)
        if why:
            self.mixture = Mixture(self.weights)
            return
        # built whole before it replaces ours: the loader's prefetch thread may be reading the order
        mixture = Mixture([1], state.get("mixture", ()))  # a flat state: one source, weight 1, from 0
        saved, ours = mixture.weights + [0] * (len(self.weights) - mixture.sources), self.weights
        changed = any(a * sum(ours) != b * sum(saved) for a, b in zip(saved, ours))  # other proportions
        if changed:
            if self.position is None:
                raise ValueError("a mixture change needs the run's position")
            mixture.begin(self.position(), ours)
        self.mixture = mixture
        if changed and self.on_change is not None:
            self.on_change(mixture.history()[-1] | {"segments": mixture.history()})

    def with_skips(self, skips: Iterable[tuple[int, int]]) -> "SampleOrder":
        """The same stream (samples, weight history) under another skip ledger."""
        other = copy.copy(self)
        other._starts, other._ends = [], []
        for start, end in skips:
            other.add_skip(start, end)
        return other

    @property
    def skips(self) -> list[tuple[int, int]]:
        """The ledger as sorted, disjoint ``(start, end)`` ranges: what a checkpoint saves."""
        return list(zip(self._starts, self._ends))

    def add_skip(self, start: int, end: int) -> None:
        """Never read stream positions ``[start, end)``; overlapping or touching ranges merge."""
        start, end = int(start), int(end)
        if start < 0 or end < start:
            raise ValueError(f"bad skip range [{start}, {end})")
        if start == end:
            return
        lo = bisect.bisect_left(self._ends, start)   # first range ending at or after start
        hi = bisect.bisect_right(self._starts, end)  # ranges before hi start at or before end
        if lo < hi:
            start, end = min(start, self._starts[lo]), max(end, self._ends[hi - 1])
        self._starts[lo:hi] = [start]
        self._ends[lo:hi] = [end]

    def sample_at(self, positions: np.ndarray) -> np.ndarray:
        """The sample index at each stream position (with one source, sample ``permutation(N, seed,
        p // N)[p % N]``; with several, the source's own stream at its draw count)."""
        source, k = self.mixture.draw(positions)
        out = np.empty_like(k)
        for s in np.unique(source):
            n = self.sizes[int(s)]
            epochs, index = np.divmod(k, n)
            for epoch in np.unique(epochs[source == s]):
                where = (source == s) & (epochs == epoch)
                out[where] = self.offsets[int(s)] + permute(n, self.seed, int(epoch), index[where])
        return out

    def source_of(self, samples: np.ndarray) -> np.ndarray:
        """The source of each sample index."""
        return np.searchsorted(self.offsets, np.asarray(samples, dtype=np.int64), side="right") - 1

    def next_batch(self, position: int, size: int) -> tuple[np.ndarray, int]:
        """The next ``size`` unskipped stream positions at or after ``position``, and the new position.

        Walks the ledger range by range, so a skip of billions of positions costs nothing.
        """
        if position < 0 or size < 0:
            raise ValueError(f"bad position {position} or size {size}")
        parts, need = [], size
        k = bisect.bisect_right(self._ends, position)  # first range that ends after position
        while need:
            if k < len(self._starts) and self._starts[k] <= position:
                position = self._ends[k]
                k += 1
                continue
            free_until = self._starts[k] if k < len(self._starts) else position + need
            take = min(need, free_until - position)
            parts.append(np.arange(position, position + take, dtype=np.int64))
            position += take
            need -= take
        return (np.concatenate(parts) if parts else np.zeros(0, np.int64)), position

    @staticmethod
    def rank_columns(batch: np.ndarray, rank: int, world: int) -> np.ndarray:
        """Rank ``rank``'s share of a global batch: rows ``rank::world``."""
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside a world of {world}")
        if len(batch) % world:
            raise ValueError(f"world size {world} does not divide the global batch of {len(batch)}")
        return batch[rank::world]


def _identity(cfg: Config, data: PreparedData, split: TokenSplit) -> dict:
    """What one source's samples are: its train shards' sha256 from its manifest (another corpus,
    or the same one re-prepared differently), the ``data.val_fraction`` cut when one was taken
    from its train split, its sample count."""
    shards = data.manifest["splits"]["train"]["shards"]
    cut = split.tokens < data.split("train").tokens
    return {"train_sha256": hashlib.sha256(" ".join(s["sha256"] for s in shards).encode()).hexdigest(),
            "val_fraction": cfg.data.val_fraction if cut else 0.0, "samples": split.num_samples(cfg.model.seq_len)}


def run_order(cfg: Config, data: PreparedData, train_split: TokenSplit | MixedSplit,
              position: Callable[[], int] | None = None) -> SampleOrder:
    """The sample order of a run on ``train_split`` of ``data`` (a :class:`MixedSplit`: of
    ``data.sources``), with its fingerprint: the seed, seq_len and each source's identity
    (:func:`_identity`). ``position``: the run's data position, where changed weights start."""
    seq = cfg.model.seq_len
    if isinstance(train_split, MixedSplit):
        sources = [{"name": n, **_identity(cfg, d, sp)}
                   for n, d, sp in zip(train_split.names, train_split.data, train_split.splits)]
        return SampleOrder(train_split.sizes(seq), cfg.seed, fingerprint={"seq_len": seq, "sources": sources},
                           accept_change=cfg.checkpoint.accept_data_change,
                           weights=[s.weight for s in cfg.data.sources], position=position)
    return SampleOrder(train_split.num_samples(seq), cfg.seed, fingerprint={"seq_len": seq, **_identity(
        cfg, data, train_split)}, accept_change=cfg.checkpoint.accept_data_change, position=position)


def batch_size_at(samples: int, cfg: BatchConfig) -> int:
    """The global batch size after ``samples`` consumed samples (Megatron-style ramp-up).

    The batch starts at ``rampup.start`` and grows by ``rampup.increment`` every
    ``rampup.samples / n`` samples, ``n = (global_size - start) / increment``, reaching
    ``global_size`` after ``rampup.samples``. Keyed on samples, not steps, so a resumed run
    and a run with another batch schedule agree on where in the ramp they are.
    """
    ramp = cfg.rampup
    if ramp is None:
        return cfg.global_size
    increments = (cfg.global_size - ramp.start) // ramp.increment  # a whole number: BatchConfig checks it
    if increments == 0 or samples >= ramp.samples:
        return cfg.global_size
    done = samples * increments // ramp.samples  # exact floor(samples / (ramp.samples / increments))
    return ramp.start + done * ramp.increment
