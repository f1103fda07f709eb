"""Carrying out the guard's decisions: rolling back past an episode, and aborting for good.

The guard (:mod:`bigtrain.stability.guard`) decides; the training loop acts, with
the functions here, on the parts a checkpoint holds (``model``, ``train``,
``order``, ``guard``).

**Rollback.** Reload the newest committed checkpoint older than the episode's
first step, ask the skip policy which stream positions never to read again, and
make the decision durable before training goes on. The order of the operations
is what makes a crash harmless at any point:

1. load the target checkpoint (in memory only; a crash here resumes from the
   newest committed checkpoint, a pre-rollback state in which the episode is met
   again and decided again);
2. ``abandon_after(target)``: delete the checkpoints of the abandoned timeline
   (a crash now resumes from the target as it was: the episode is met again);
3. save the restored state, with its new skips and rollback count, at the target's
   step: the checkpointer replaces a committed step atomically, so a crash leaves
   the old target (pre-rollback) or the new one (post-rollback), never a state
   that forgets the skips while its timeline continues;
4. record ``rollback`` in the ledger, once the decision is durable (a crash in the
   instant between the commit and this line leaves the ledger, not the run, one
   rollback short).

**Skip policy.** ``skip_policy(episode, window) -> [(start, end), ...]``: the
stream ranges to put in the skip ledger. ``window`` is ``(position of the
restored state, end of the episode's last batch + stability.rollback_margin
batches)``. :func:`skip_window` skips all of it (the PaLM recipe); a policy that
finds the culprit samples can return single positions ``(p, p + 1)`` instead.

**Abort.** ``RUN_DIR/ABORTED`` (JSON: step, reason, the config's fingerprint) is
written before :class:`StabilityAbort` is raised. A restarted job (``torchrun
--max-restarts``, a requeue) with the same config finds it and exits 3 at once
instead of replaying the episode; a changed config (or removing the file) goes on.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

from bigtrain.config import Config
from bigtrain.ledger import Ledger
from bigtrain.parallel.env import DistEnv
from bigtrain.stability.guard import Decision

SkipPolicy = Callable[[tuple, tuple[int, int]], list[tuple[int, int]]]


def skip_window(episode: tuple, window: tuple[int, int]) -> list[tuple[int, int]]:
    """Skip the whole window: every sample from the restored position to past the episode."""
    return [window]


def rollback_target(checkpointer, first_step: int | None) -> int | None:
    """The step of the newest committed checkpoint older than ``first_step`` (None: none, or no episode)."""
    if first_step is None:
        return None
    older = [s for s, _ in checkpointer.committed() if s < first_step]
    return older[-1] if older else None


def roll_back(decision: Decision, checkpointer, parts: dict, skip_policy: SkipPolicy, margin: int,
              ledger: Ledger, log) -> dict | None:
    """Carry out a rollback decision (see the module docstring); ``log(line)`` says what was done.
    Returns its record, or None when no committed checkpoint predates the episode. Every rank calls it."""
    guard, order, state = parts["guard"], parts["order"], parts["train"]
    to_step = rollback_target(checkpointer, decision.first_step)
    if to_step is None:
        return None
    path = dict(checkpointer.committed())[to_step]
    last = decision.episode[-1]
    # the margin counts batches of readable data, so measure it on the ledger in force now
    _, window_end = order.next_batch(last["end"], margin * last["size"])
    memory = guard.state_dict()
    checkpointer.load(path, parts)  # model, optimizer, train state, skip ledger, guard, RNG
    skips = [(int(a), int(b)) for a, b in skip_policy(decision.episode, (state.position, window_end))]
    for start, end in skips:
        order.add_skip(start, end)
    entry = guard.rolled_back(memory, decision, to_step, skips)
    checkpointer.abandon_after(to_step)
    checkpointer.save(to_step, parts)
    checkpointer.wait()
    ledger.record("rollback", entry["step"], to_step=to_step, skips=entry["skips"],
                  rollbacks=len(guard.rollbacks), chain=guard.chain["rollbacks"], checkpoint=str(path))
    shown = ", ".join(f"[{a}, {b})" for a, b in skips[:8]) + (f" and {len(skips) - 8} more" if len(skips) > 8 else "")
    log(f"stability: step {entry['step']}: {len(decision.episode)} anomalous steps in a row; rolled back to "
        f"step {to_step} and skipped stream positions {shown}")
    return entry


class AbortMark:
    """``RUN_DIR/ABORTED``: an abort survives restarts until the config changes or a person removes it."""

    def __init__(self, cfg: Config, env: DistEnv):
        self.path = Path(cfg.run_dir) / "ABORTED"
        self.env = env
        self.fingerprint = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()

    def write(self, step: int, reason: str) -> None:
        """Durably, on rank 0; every rank waits for it, so that no rank exits 3 before it exists."""
        if self.env.is_main:
            tmp = self.path.with_suffix(".tmp")
            with open(tmp, "w") as f:
                json.dump({"step": step, "reason": reason, "config_sha256": self.fingerprint}, f)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        self.env.barrier()

    def check(self, log) -> str | None:
        """The line to exit with when this config already aborted here, else None (rank 0 reads,
        every rank gets its answer). A mark left by another config is removed: the person
        changed something to get past the abort."""
        answer = None
        if self.env.is_main and self.path.is_file():
            mark = json.loads(self.path.read_text())
            if mark.get("config_sha256") == self.fingerprint:
                answer = (f"bigtrain: {self.path.parent} aborted at step {mark['step']} ({mark['reason']}); "
                          f"remove {self.path} or change the config (e.g. its stability section) to go on")
            else:
                log(f"bigtrain: {self.path} (aborted at step {mark['step']}) was written under another "
                    "config; going on and removing it")
                self.path.unlink()
        return self.env.broadcast_object(answer)
