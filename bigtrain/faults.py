"""Deliberate fault injection, for tests and demos. Everything is off by default and
the trainer announces in its log whatever is switched on.

Step numbers are 1-based, as in ``metrics.jsonl``: "step N" is the N-th update.

* ``faults.spike_at: [N, ...]``: the batches that steps N read (in a run without
  rollbacks) are bad data: their tokens are replaced with random ones, so the loss
  and the gradient norm genuinely spike through the real forward and backward.
  The fault belongs to the *data* (stream positions), as real bad data does: a
  rollback that skips the window leaves it behind for good, and a resumed run meets
  it again at the same step. The random tokens are drawn for the whole global batch
  and then split by rank, so the corrupted batch is the same at any world size.
* ``faults.nan_at: [N, ...]``: after the backward of step N (and after any gradient
  all-reduce), a NaN is written into a gradient on rank ``faults.rank`` only. Only
  that rank can see it, so this tests that every rank still skips the update.
* ``faults.crash_at: [N, ...]``: rank ``faults.rank`` kills itself with SIGKILL at
  the boundary after step N, once the guard's decision is carried out and before
  that step's checkpoint, as a node failure would. When step N triggered a rollback,
  that is right after the rollback.
* ``faults.crash_in_checkpoint_at: N``: rank ``faults.rank`` kills itself with
  SIGKILL while writing step N's checkpoint: after its shards are on disk, before
  the commit.

A crash fires once per run directory: it leaves a marker in ``RUN_DIR/faults/``
first, so the job that ``torchrun --max-restarts`` (or a requeue) starts again
runs through the same step.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

import torch

from bigtrain.config import Config, ConfigError
from bigtrain.data.loader import Batch
from bigtrain.data.order import batch_size_at
from bigtrain.parallel.backend import backend_class
from bigtrain.parallel.env import DistEnv


def check_faults(cfg: Config, world: int) -> None:
    """Refuse a fault that cannot be injected (checked before any process group starts)."""
    f = cfg.faults
    if (f.nan_at or f.crash_at or f.crash_in_checkpoint_at is not None) and f.rank >= world:
        raise ConfigError(f"config error: faults.rank={cfg.faults.rank} does not exist in a world of {world}")
    if f.nan_at and not backend_class(cfg.parallel.backend).has_local_grads:
        # DeepSpeed moves reduced gradients into its own partition buffers: no .grad to poison
        raise ConfigError("config error: faults.nan_at needs parallel.backend none or fsdp "
                          "(use faults.spike_at with deepspeed)")


def nominal_windows(steps: list[int], cfg: Config) -> list[tuple[int, int]]:
    """Stream positions ``[start, end)`` that each of ``steps`` reads in a run without skips."""
    wanted, windows, position = set(steps), [], 0
    for step in range(1, max(steps, default=0) + 1):
        size = batch_size_at(position, cfg.batch)  # without skips, samples consumed == position
        if step in wanted:
            windows.append((position, position + size))
        position += size
    return windows


class Faults:
    def __init__(self, cfg: Config, env: DistEnv):
        self.cfg, self.env, self.rank = cfg, env, env.rank
        self.bad_data = nominal_windows(cfg.faults.spike_at, cfg)

    def describe(self) -> str | None:
        """One line for the log when any fault is on, else None."""
        f = self.cfg.faults
        on = [f"spike_at={f.spike_at} (stream positions {self.bad_data})"] if f.spike_at else []
        on += [f"nan_at={f.nan_at} on rank {f.rank}"] if f.nan_at else []
        on += [f"crash_at={f.crash_at} on rank {f.rank}"] if f.crash_at else []
        on += [f"crash_in_checkpoint_at={f.crash_in_checkpoint_at} on rank {f.rank}"] \
            if f.crash_in_checkpoint_at is not None else []
        return "FAULT INJECTION ON: " + "; ".join(on) if on else None

    def corrupt_batch(self, batch: Batch) -> Batch:
        """Random tokens in place of a batch that reads any bad-data position."""
        pos = batch.positions
        if not any(((pos >= a) & (pos < b)).any() for a, b in self.bad_data):
            return batch
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + int(pos[0]))
        rows = torch.randint(self.cfg.model.vocab_size, (batch.size, batch.tokens.shape[1]), generator=g)
        batch.tokens = rows[self.env.dp_rank::self.env.dp_size].to(batch.tokens.device)  # this rank's rows
        return batch

    def corrupt_grads(self, step: int, backend) -> None:
        """A NaN in the first non-empty gradient of rank ``faults.rank`` at steps ``nan_at``."""
        if step not in self.cfg.faults.nan_at or self.rank != self.cfg.faults.rank:
            return
        grad = next((g for g in backend.grads() if g.numel()), None)
        if grad is None:
            raise RuntimeError(f"faults.nan_at: rank {self.rank} holds no gradient to corrupt at step {step}")
        grad.view(-1)[0] = float("nan")

    def crash_at(self, step: int) -> None:
        """SIGKILL at the boundary after ``step`` when it is in ``faults.crash_at``."""
        if step in self.cfg.faults.crash_at:
            self._crash(f"step-{step:08d}")

    def crash_in_checkpoint(self, step: int) -> None:
        """SIGKILL in the middle of writing ``step``'s checkpoint, if so configured."""
        if step == self.cfg.faults.crash_in_checkpoint_at:
            self._crash(f"checkpoint-{step:08d}")

    def _crash(self, name: str) -> None:
        if self.rank != self.cfg.faults.rank:
            return
        marker = Path(self.cfg.run_dir) / "faults" / f"crashed-{name}"
        if marker.exists():
            return  # already fired in an earlier attempt of this run
        marker.parent.mkdir(parents=True, exist_ok=True)
        with open(marker, "w") as f:
            f.write(f"rank {self.rank}\n")
            f.flush()
            os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
