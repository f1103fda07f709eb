"""Weighted mixtures of prepared sources: which source every stream position draws from.

A mixture run reads several prepared directories ("sources") with weights. The
global sample stream of :mod:`bigtrain.data.order` stays one stream of positions
(the skip ledger, rank columns, resume and ``inspect`` work on positions, unchanged);
this module maps a position ``p`` to ``(source s, k)``: ``p`` is the ``k``-th draw
from ``s``. Source ``s`` then reads its own infinite stream at ``k``, i.e. sample
``permutation(N_s, seed, k // N_s)[k % N_s]`` of its own: each source walks its own
epochs, so a small source that runs out starts its next epoch without disturbing the
others. (Every source uses the run's seed: their index orders need no independence,
their contents differ; and a one-source run is then exactly the order it always was.)

**Interleaving.** Weights are honoured over every window, not only on average: the
draws are a deterministic low-discrepancy sequence computed in closed form per
position (no state, no RNG). The sources are the leaves of a balanced binary tree;
at a node with integer weights ``A`` (left) of ``T`` (both), the ``j``-th position
that reaches the node goes left iff ``floor(((j+1)A + T/2) / T) > floor((jA + T/2) / T)``
(the left count after ``j`` positions is ``jA/T`` rounded to nearest: a Beatty
sequence). Each of the ``ceil(log2 S)`` levels adds at most half a draw of error, so
the first ``n`` positions hold ``n w_s`` draws of source ``s`` within half a draw per
level, and *any* window of ``n`` consecutive positions within one draw per level (one
for two sources). Weights ``0.7, 0.3`` give exactly 7 of every 10.
Cost: O(log S) integer operations per position, vectorised over a batch.

**Segments.** The weights may change mid-run (an annealing stage). The history is a
list of *segments* ``(start position, integer weights, draws of each source before
start)``; position ``p`` belongs to the last segment starting at or before it, and
its draw is the segment's draws at its start plus the interleaving of ``p - start``
with the segment's weights. The history is part of the order's checkpointed state
and of the ledger (``mixture`` events), so every step stays reproducible.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Sequence

import numpy as np

RESOLUTION = 2**20   # weights are integers summing to at most this (finer ones are rounded to it)
MAX_POSITION = 2**42  # j * A stays below 2**63 in int64 arithmetic


def integer_weights(weights: Sequence[float]) -> list[int]:
    """The smallest integers in the proportions of ``weights`` (0.7, 0.3 -> 7, 3), or, when the
    proportions need a denominator above :data:`RESOLUTION`, the proportions rounded to
    1 / RESOLUTION (largest remainders, so they still sum to RESOLUTION)."""
    total = math.fsum(weights)
    if total <= 0 or any(w < 0 for w in weights):
        raise ValueError(f"weights {list(weights)}: expected non-negative numbers with a positive sum")
    shares = [Fraction(w / total).limit_denominator(1000) for w in weights]
    if sum(shares) == 1 and all(abs(float(s) - w / total) < 1e-12 for s, w in zip(shares, weights)):
        lcm = math.lcm(*(s.denominator for s in shares))
        if lcm <= RESOLUTION:
            return [int(s * lcm) for s in shares]
    exact = [w / total * RESOLUTION for w in weights]
    out = [math.floor(x) for x in exact]
    for i in sorted(range(len(exact)), key=lambda i: out[i] - exact[i])[:RESOLUTION - sum(out)]:
        out[i] += 1
    g = math.gcd(*out)
    return [x // g for x in out]


class Interleave:
    """The closed-form interleaving of sources with integer ``weights`` (see the module docstring)."""

    def __init__(self, weights: Sequence[int]):
        self.weights = [int(w) for w in weights]
        self._prefix = np.concatenate([[0], np.cumsum(self.weights)]).astype(np.int64)

    def draw(self, j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For local indices ``j``: (the source each draws from, how many earlier indices drew from it)."""
        j = np.asarray(j, dtype=np.int64).copy()
        if len(self.weights) == 1:  # one source: every index is its own draw, at any scale
            return np.zeros_like(j), j
        if j.size and (j.min() < 0 or j.max() >= MAX_POSITION):
            raise ValueError(f"mixture index outside [0, {MAX_POSITION})")
        lo, hi = np.zeros_like(j), np.full_like(j, len(self.weights))
        while True:
            inner = hi - lo > 1
            if not inner.any():
                return lo, j
            mid = (lo + hi) // 2
            left = self._prefix[mid] - self._prefix[lo]
            total = np.maximum(self._prefix[hi] - self._prefix[lo], 1)  # 0 only where nothing arrives
            half = total // 2
            before = (j * left + half) // total
            goes_left = (j + 1) * left + half >= (before + 1) * total
            lo = np.where(inner & ~goes_left, mid, lo)
            hi = np.where(inner & goes_left, mid, hi)
            j = np.where(inner, np.where(goes_left, before, j - before), j)

    def counts(self, n: int) -> list[int]:
        """Draws of each source among the first ``n`` indices."""
        out = [0] * len(self.weights)

        def split(lo: int, hi: int, n: int) -> None:
            if hi - lo == 1:
                out[lo] = n
                return
            mid = (lo + hi) // 2
            total = int(self._prefix[hi] - self._prefix[lo])
            left = (n * int(self._prefix[mid] - self._prefix[lo]) + total // 2) // total if total else 0
            split(lo, mid, left)
            split(mid, hi, n - left)

        split(0, len(self.weights), int(n))
        return out


@dataclass
class Segment:
    start: int           # first stream position read with these weights
    weights: list[int]   # integer weights, one per source
    draws: list[int]     # draws of each source before ``start``

    def to_dict(self) -> dict:
        return {"start": self.start, "weights": list(self.weights), "draws": list(self.draws)}


class Mixture:
    """Stream position -> (source, draw), over the segments of a run's weight history."""

    def __init__(self, weights: Sequence[int], segments: Sequence[dict] = ()):
        """``weights``: the integer weights of a run that starts here; ``segments``: a saved history
        instead (``[{start, weights, draws}, ...]``, as :meth:`history` writes it)."""
        self.segments = [Segment(int(s["start"]), [int(w) for w in s["weights"]], [int(d) for d in s["draws"]])
                         for s in segments] or [Segment(0, list(weights), [0] * len(weights))]
        self._starts = [s.start for s in self.segments]
        self._interleaves = [Interleave(s.weights) for s in self.segments]

    @property
    def sources(self) -> int:
        return len(self.segments[-1].weights)

    @property
    def weights(self) -> list[int]:
        return self.segments[-1].weights

    def history(self) -> list[dict]:
        return [s.to_dict() for s in self.segments]

    def draw(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, k) of every position: it is the k-th draw (0-based) from that source."""
        pos = np.asarray(positions, dtype=np.int64)
        source, k = np.empty_like(pos), np.empty_like(pos)
        seg = np.searchsorted(np.asarray(self._starts, dtype=np.int64), pos, side="right") - 1
        for i in np.unique(seg):
            where = seg == i
            segment = self.segments[int(i)]
            s, m = self._interleaves[int(i)].draw(pos[where] - segment.start)
            source[where] = s
            k[where] = np.asarray(segment.draws, dtype=np.int64)[s] + m
        return source, k

    def draws_before(self, position: int) -> list[int]:
        """Draws of each source before stream position ``position``."""
        i = bisect.bisect_right(self._starts, position) - 1
        segment = self.segments[i]
        done = [d + c for d, c in zip(segment.draws, self._interleaves[i].counts(position - segment.start))]
        return done + [0] * (self.sources - len(done))  # sources added later had none

    def begin(self, position: int, weights: Sequence[int]) -> None:
        """Read with ``weights`` from stream position ``position`` on (sources may be added at
        the end); what the history held past ``position`` is dropped."""
        weights = [int(w) for w in weights]
        if len(weights) < self.sources:
            raise ValueError(f"{len(weights)} weights for {self.sources} sources")
        draws = self.draws_before(position) + [0] * (len(weights) - self.sources)
        keep = bisect.bisect_left(self._starts, position)
        self.segments[keep:] = [Segment(int(position), weights, draws)]
        self._starts = [s.start for s in self.segments]
        self._interleaves = [Interleave(s.weights) for s in self.segments]
