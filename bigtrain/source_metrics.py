"""Per-source metrics of a mixture run (``data.sources``): training loss and eval, per source.

**Training loss.** ``loss/<name>`` is the token-weighted mean cross-entropy of the samples
drawn from each source since the last logged step, over the whole global batch (every
rank's rows). The backend hands over each micro-batch's per-row cross-entropy sums (the
same cross-entropy the step's loss is summed from: :meth:`Backend.loss_terms`); they are
added into one small tensor per source *on the device*, with no host sync, and reduced
over ranks (one all-reduce) only when a step is logged. Token counts need no reduction:
every rank knows the global batch's samples, hence how many rows each source holds.

**Eval.** A mixture evaluates each source's own val split (``eval/val_loss/<name>``), and
``val_loss`` is their mean weighted by the current mixture weights: the loss of the data
the run is training on. One-source runs evaluate as they always did.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from bigtrain.data.dataset import MixedSplit
from bigtrain.data.order import SampleOrder


class SourceLoss:
    """Per-source CE sums of the steps since the last log; a no-op for one source."""

    def __init__(self, names: list[str], order: SampleOrder, backend, seq_len: int):
        self.names, self.order, self.backend, self.seq_len = names, order, backend, seq_len
        self.enabled = len(names) > 1
        env = backend.env
        self.sums = torch.zeros(len(names), dtype=torch.float32, device=env.device)
        self.tokens = np.zeros(len(names), dtype=np.int64)
        self._onehot: torch.Tensor | None = None  # [rows, sources] of this rank's rows in this step
        self._cursor = 0

    @contextlib.contextmanager
    def reading(self, batch):
        """Around one training step of ``batch``: route its rows' cross-entropy to their sources."""
        if not self.enabled:
            yield
            return
        env = self.backend.env
        sources = self.order.source_of(batch.samples)
        self.tokens += np.bincount(sources, minlength=len(self.names)) * self.seq_len
        mine = SampleOrder.rank_columns(sources, env.dp_rank, env.dp_size)  # this rank's rows, in order
        onehot = torch.from_numpy(np.eye(len(self.names), dtype=np.float32)[mine])
        if env.device.type == "cuda":  # a copy from pageable memory would wait for the GPU: a host sync
            onehot = onehot.pin_memory()
        self._onehot, self._cursor = onehot.to(env.device, non_blocking=True), 0
        self.backend.row_sink = self._add
        try:
            yield
        finally:
            self.backend.row_sink, self._onehot = None, None

    def _add(self, row_ce: torch.Tensor) -> None:
        """One micro-batch's per-row CE sums (its rows follow the previous micro-batch's). A product
        with the rows' one-hot sources, not ``index_add_``: that one adds with atomics on CUDA, in
        no fixed order, and the per-source losses would not repeat bitwise."""
        rows = self._onehot[self._cursor:self._cursor + row_ce.shape[0]]
        self.sums += rows.T @ row_ce.detach().float()
        self._cursor += row_ce.shape[0]

    def collect(self) -> dict:
        """``{"loss/<name>": mean}`` since the last call (sources read since then); a collective
        on every rank, as log steps are."""
        if not self.enabled:
            return {}
        env = self.backend.env  # the ranks of a tp group hold the same sums: counted once
        sums = (env.all_reduce(self.sums.clone()) / env.tp).cpu().numpy()
        out = {f"loss/{name}": float(s / t) for name, s, t in zip(self.names, sums, self.tokens) if t}
        self.sums.zero_()
        self.tokens[:] = 0
        return out


def eval_sets(val, weights: dict[str, float]) -> list[tuple[str | None, float, object]]:
    """(name, weight, split) of what an eval reads: one unnamed split, or each source's."""
    if isinstance(val, MixedSplit):
        return [(name, weights.get(name, 0.0), split) for name, split in zip(val.names, val.splits)]
    return [(None, 1.0, val)]
