"""Which samples made an episode spike: skip the culprits, not the window.

A rollback used to skip every stream position from the checkpoint's data position
to the end of the last anomalous batch: with ``checkpoint.every: 1000`` that is a
thousand batches of mostly good data thrown away for a handful of bad samples.
Since a step's batch can be rebuilt exactly (``bigtrain.data.order``), the guard
can instead *score* the samples of the anomalous batches under the restored,
pre-episode model and skip only the ones that stand out.

The score is a sample's mean next-token cross-entropy (nats per token) under that
model. Bad data that makes a loss spike (random bytes, binary junk, another
language, a broken tokenizer's output) is data the model cannot predict, so its
per-sample loss is far above the rest of the batch. On the planted-garbage
benchmarks (bench/culprits.py) the loss alone finds every planted sample and flags
no clean one, so no second score is computed. What it cannot see is low-entropy
junk (one token repeated): its loss is ordinary, only its gradient is large (a
per-sample gradient norm would find it, at a backward per sample and with
gradients kept per rank, which FSDP and ZeRO reduce away). Such an episode yields
no culprit, and the guard falls back to skipping the window: never worse than before.

The rule (:func:`choose`) is Rosner's generalised extreme-studentised-deviate
test with robust statistics: for ``i = 1 .. n/2``, drop the ``i - 1`` highest
scores and ask whether the highest remaining one is more than ``THRESHOLD``
robust sigmas (1.4826 MAD) *and* ``FLOOR`` nats above the median of what
remains; the culprits are the ``i`` highest for the largest ``i`` that passes.
Because each test uses only the scores below the candidate, it stays exact
when up to half of the episode's samples are bad (a plain median/MAD cut does
not: at 50% garbage the median sits between the two groups). ``FLOOR`` keeps a
clean batch, whose spread can be tiny late in training, from yielding any.

Cost: one forward per sample of the episode, no backward: with an episode of
``k`` batches, ``k / 3`` step-equivalents (a forward is about a third of a step).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from bigtrain.data.order import SampleOrder
from bigtrain.parallel.env import DistEnv

THRESHOLD = 6.0   # robust sigmas above the median of the samples below the candidate
FLOOR = 1.0       # nats per token: a culprit's loss is at least this far above that median


@dataclass(frozen=True)
class Culprits:
    positions: list[int]   # stream positions of the culprit samples, sorted (the same on every rank)
    scores: list[float]    # their mean cross-entropy, nats per token, in the order of ``positions``
    median: float          # median score of the samples kept: the reference
    sigma: float           # their robust sigma (1.4826 MAD)
    scored: int            # samples scored, one forward each, over all ranks (the search's cost)

    def ledger_fields(self) -> dict:
        """What the ledger's ``culprits`` event holds besides its step."""
        return {"positions": self.positions, "scores": [round(s, 4) for s in self.scores],
                "median": round(self.median, 4), "sigma": round(self.sigma, 4), "scored": self.scored}


def _robust(x: np.ndarray) -> tuple[float, float]:
    med = float(np.median(x))
    return med, 1.4826 * float(np.median(np.abs(x - med)))


def choose(scores: np.ndarray, positions: np.ndarray) -> Culprits | None:
    """The culprits among samples with these ``scores`` (see the module docstring), or None."""
    scores, positions = np.asarray(scores, dtype=np.float64), np.asarray(positions, dtype=np.int64)
    if not np.isfinite(scores).all():  # the restored model itself is broken: no ranking to trust
        return None
    order = np.argsort(scores, kind="stable")
    ranked = scores[order]
    n, found = len(ranked), 0
    for i in range(1, n // 2 + 1):   # candidate: ranked[n - i], tested against the n - i below it
        med, sigma = _robust(ranked[:n - i])
        gap = ranked[n - i] - med
        if gap > FLOOR and gap > THRESHOLD * sigma:
            found = i
    if not found:
        return None
    med, sigma = _robust(ranked[:n - found])
    top = np.sort(order[n - found:])
    picked = sorted(zip(positions[top].tolist(), scores[top].tolist()))
    return Culprits([p for p, _ in picked], [s for _, s in picked], med, sigma, n)


@torch.no_grad()
def score_samples(model: torch.nn.Module, autocast, env: DistEnv, split, seq_len: int, micro_size: int,
                  batches: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Mean cross-entropy of every sample of ``batches`` (global order, concatenated), on every rank.

    Each rank scores its own columns ``rank::world`` of each global batch, as its loader
    would read them, so no rank reads another's rows. Every rank runs the same number of
    forwards (global batch sizes divide by the world size, so every rank holds the same
    number of rows): FSDP and ZeRO-3 forwards are collectives. The scores are gathered with
    one all-reduce of a zero-filled global vector, in fp32 on ``env.device`` (nccl on GPU):
    every entry has one non-zero term, so the sum is exact and every rank decides on the
    very same numbers.
    """
    samples = [np.asarray(s) for _, s in batches]
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in samples])]).astype(np.int64)
    rank, world = env.dp_rank, env.dp_size  # a tp group reads the same rows; its first rank reports them
    rows = np.concatenate([SampleOrder.rank_columns(s, rank, world) for s in samples])
    where = np.concatenate([np.arange(o, o + len(s))[rank::world] for o, s in zip(offsets, samples)])
    mine = []
    was_training = model.training
    model.train(False)  # no dropout: a score must not depend on the rank's RNG
    try:
        for i in range(0, len(rows), micro_size):
            tokens = torch.from_numpy(split.batch(rows[i:i + micro_size], seq_len)).to(env.device)
            with autocast():
                logits = model(tokens[:, :-1])
            if isinstance(logits, DTensor):  # parallel.loss_parallel: sharded over the vocabulary
                logits = logits.full_tensor()
            ce = F.cross_entropy(logits.float().transpose(1, 2), tokens[:, 1:], reduction="none")
            mine.append(ce.mean(dim=1))
    finally:
        model.train(was_training)
    full = torch.zeros(int(offsets[-1]), dtype=torch.float32, device=env.device)
    if mine and env.tp_rank == 0:
        full[torch.from_numpy(where).to(env.device)] = torch.cat(mine).float()
    return env.all_reduce(full).cpu().numpy()


def find_culprits(backend, env: DistEnv, split, seq_len: int, micro_size: int,
                  batches: list[tuple[np.ndarray, np.ndarray]]) -> Culprits | None:
    """The samples of ``batches`` (each a global batch's stream positions and sample indices)
    that stand out under the backend's current model, the same on every rank; None when none
    does (the caller then skips the whole window). Every rank must call it."""
    scores = score_samples(backend.model, backend.autocast, env, split, seq_len, micro_size, batches)
    return choose(scores, np.concatenate([np.asarray(p) for p, _ in batches]))


def culprit_policy(backend, env: DistEnv, order: SampleOrder, split, seq_len: int, micro_size: int, ledger):
    """The skip policy of ``stability.skip: culprits`` (see :mod:`bigtrain.stability.recovery`):
    rebuild the episode's batches (the ledger restored with the checkpoint is the one they were
    read under), score them under the restored model and skip only the culprits, recorded in
    the ledger as a ``culprits`` event; the whole window when no sample stands out."""
    def policy(episode, window: tuple[int, int]) -> list[tuple[int, int]]:
        batches = []
        for e in episode:
            positions, _ = order.next_batch(e["start"], e["size"])
            batches.append((positions, order.sample_at(positions)))
        found = find_culprits(backend, env, split, seq_len, micro_size, batches)
        if found is None:
            return [window]
        ledger.record("culprits", episode[-1]["step"], **found.ledger_fields())
        return [(p, p + 1) for p in found.positions]
    return policy
