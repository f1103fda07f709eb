"""Turns the global sample order into this rank's tensors, one step ahead.

The order (``order.py``) decides *which* samples a global batch holds; this
module reads this rank's columns of it from the memory-mapped tokens and hands
them over as tensors. A background thread prepares the next batch while the
current step computes, so the step never waits on the disk. A prefetched batch
is used only if it was made for exactly the (position, size, skip ledger) now
asked for; after a rollback or a ramp-up change it is simply recomputed.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from bigtrain.data.order import SampleOrder


@dataclass
class Batch:
    step_position: int          # the stream position the batch was asked for (its first unskipped one is positions[0])
    next_position: int          # stream position after the batch
    positions: np.ndarray       # the global batch's stream positions (all ranks)
    samples: np.ndarray         # the global batch's sample indices (all ranks)
    tokens: torch.Tensor        # this rank's rows, [rows, seq_len + 1] int64

    @property
    def size(self) -> int:
        return len(self.positions)

    def micro_batches(self, micro_size: int):
        """(inputs, targets) pairs of at most ``micro_size`` rows each."""
        for i in range(0, self.tokens.shape[0], micro_size):
            rows = self.tokens[i:i + micro_size]
            yield rows[:, :-1], rows[:, 1:]


class BatchLoader:
    def __init__(self, split, order: SampleOrder, seq_len: int, rank: int, world: int,
                 device: torch.device, prefetch: int = 1):
        self.split, self.order, self.seq_len = split, order, seq_len
        self.rank, self.world, self.device = rank, world, device
        self.pool = ThreadPoolExecutor(max_workers=1) if prefetch > 0 else None
        self.pending: tuple[tuple, Future] | None = None

    def _key(self, position: int, size: int) -> tuple:
        return position, size, tuple(self.order.skips)

    def _make(self, position: int, size: int) -> Batch:
        positions, next_position = self.order.next_batch(position, size)
        samples = self.order.sample_at(positions)
        mine = self.order.rank_columns(samples, self.rank, self.world)
        tokens = torch.from_numpy(self.split.batch(mine, self.seq_len))
        if self.device.type == "cuda":
            tokens = tokens.pin_memory()
        return Batch(position, next_position, positions, samples, tokens)

    def get(self, position: int, size: int, next_size: int | None = None) -> Batch:
        """The batch of ``size`` starting at ``position``; prefetch the following one
        (of ``next_size``, default ``size``)."""
        key = self._key(position, size)
        if self.pending is not None and self.pending[0] == key:
            batch = self.pending[1].result()
        else:
            batch = self._make(position, size)
        self.pending = None
        if self.pool is not None:
            nsize = next_size or size
            self.pending = (self._key(batch.next_position, nsize),
                            self.pool.submit(self._make, batch.next_position, nsize))
        batch.tokens = batch.tokens.to(self.device, non_blocking=True)
        return batch

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
