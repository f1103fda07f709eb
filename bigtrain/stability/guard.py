"""What to do about an anomalous step: skip it, roll back past it, or stop.

The PaLM recipe, done automatically and identically on every rank:

* **skip**: a step the detector calls ``spike`` or ``nonfinite`` is not applied.
  The trainer simply does not call clip and step, and clears the gradients, so
  parameters, optimizer moments and the optimizer's step count stay exactly as
  they were. (Masking the update by multiplying with 0 would not do: 0 * NaN is
  NaN.) Since a non-finite update is never applied, no checkpoint can ever hold
  a non-finite value. The skipped step still consumes its data.
* **rollback**: ``stability.max_consecutive`` anomalous steps in a row mean the
  trouble persists. Reload the newest committed checkpoint older than the first
  step of this episode, add the stream positions from that checkpoint's data
  position to the end of the last anomalous batch, plus
  ``stability.rollback_margin`` more global batches, to the skip ledger, and go on.
  Replaying the same data from an earlier state is what spiked; the data window
  is never read again.
* **abort**: an episode that persists after ``stability.max_rollbacks`` rollbacks
  (or with no checkpoint to go back to) stops the run with :class:`StabilityAbort`
  (exit status 3), naming the steps and their stream positions. Checkpoints are
  left as they are.

Every decision is appended to ``RUN_DIR/ledger.jsonl`` (and TensorBoard). The
guard's state goes into every checkpoint so that a resumed run makes the same
decisions. A rollback restores the *detector* from the checkpoint (its window
belongs to that model state) but keeps what the run has learnt since: the
rollbacks done and the data windows they skipped, which are re-applied to the
skip ledger after the reload.

``stability.enabled: false`` turns off spike detection, rollback and abort; a
non-finite update is still never applied.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from bigtrain.config import StabilityConfig
from bigtrain.ledger import Ledger
from bigtrain.parallel.env import DistEnv
from bigtrain.stability.detector import NONFINITE, OK, SpikeDetector


class StabilityAbort(RuntimeError):
    """The run cannot get past an anomaly; the CLI exits with :attr:`exit_code`."""
    exit_code = 3


@dataclass(frozen=True)
class Verdict:
    kind: str                       # ok | spike | nonfinite
    loss: float
    grad_norm: float
    details: dict = field(default_factory=dict)  # robust z-scores of a spike

    @property
    def apply(self) -> bool:
        """Whether the update may be applied."""
        return self.kind == OK


class Guard:
    def __init__(self, cfg: StabilityConfig, env: DistEnv, ledger: Ledger):
        self.cfg, self.env, self.ledger = cfg, env, ledger
        self.detector = SpikeDetector(cfg.window, cfg.warmup, cfg.threshold)
        self.episode: list[dict] = []    # the current run of consecutive anomalous steps
        self.rollbacks: list[dict] = []  # every rollback so far, with the window it skipped
        self.skipped = 0                 # updates not applied, over the whole run
        self.last: Verdict | None = None
        self.batches: list = []          # TEMPORARY (culprits branch): the episode's (positions, samples)

    # ------------------------------------------------------------------ per step
    def judge(self, loss: float, grad_norm: float, local_nonfinite: bool) -> Verdict:
        """The verdict on a step, before its update. ``local_nonfinite`` is this rank's
        own view (its loss or any of its gradients); it is OR-reduced over ranks, so a
        NaN that only one rank sees still stops the update on every rank."""
        nonfinite = self.env.any(local_nonfinite)
        if self.cfg.enabled:
            kind, details = self.detector.judge(loss, grad_norm, nonfinite)
        else:
            kind, details = (NONFINITE if nonfinite else OK), {}
        self.last = Verdict(kind, loss, grad_norm, details)
        return self.last

    def after_step(self, trainer, batch) -> bool:
        """Record the step's verdict and act on an episode that persists.

        Called once the trainer's state has moved past ``batch``. Returns True when
        the run was rolled back (``trainer.state`` now is the checkpoint's).
        Raises :class:`StabilityAbort` when it cannot go on.
        """
        v, step = self.last, trainer.state.step
        if v.apply:
            self.episode, self.batches = [], []
            return False
        where = {"start": int(batch.step_position), "end": int(batch.next_position)}
        self.ledger.record(v.kind, step, loss=v.loss, grad_norm=v.grad_norm, **v.details, **where)
        self.ledger.record("skip", step, **where)
        self.skipped += 1
        if not self.cfg.enabled:
            return False
        self.episode.append({"step": step, **where})
        self.batches.append((batch.positions, batch.samples))
        if len(self.episode) < self.cfg.max_consecutive:
            return False
        if len(self.rollbacks) >= self.cfg.max_rollbacks:
            self.abort(trainer, f"anomalies persisted after {len(self.rollbacks)} rollback(s) "
                                f"(stability.max_rollbacks={self.cfg.max_rollbacks})")
        self.rollback(trainer, batch)
        return True

    # ------------------------------------------------------------------ actions
    def rollback(self, trainer, batch) -> None:
        step, first, count = trainer.state.step, self.episode[0]["step"], len(self.episode)
        older = [(s, p) for s, p in trainer.checkpointer.committed() if s < first]
        if not older:
            self.abort(trainer, f"no committed checkpoint before step {first} to roll back to")
        to_step, path = older[-1]
        # the margin counts batches of readable data, so measure it on the current ledger
        _, skip_end = trainer.order.next_batch(batch.next_position, self.cfg.rollback_margin * batch.size)
        rollbacks, skipped = self.rollbacks, self.skipped
        trainer.checkpointer.load(trainer, path)  # model, optimizer, state, skips, detector, RNG
        self.rollbacks, self.skipped, self.episode = rollbacks, skipped, []
        entry = {"step": step, "to_step": to_step, "skip_start": trainer.state.position, "skip_end": skip_end}
        # TEMPORARY hook (culprits branch) until the loop's pluggable skip policy lands: score the
        # episode's batches under the restored model and skip only the samples that stand out.
        found = None
        if self.cfg.skip == "culprits" and len(self.batches) == count:
            from bigtrain.stability.culprits import find_culprits
            found = find_culprits(trainer.backend, self.env, trainer.train_split, trainer.cfg.model.seq_len,
                                  trainer.cfg.batch.micro_size, self.batches)
        self.batches = []
        if found is not None:
            entry.update(skip_end=entry["skip_start"], positions=found.positions)
        self.rollbacks.append(entry)
        for r in self.rollbacks:  # the checkpoint may predate earlier rollbacks too
            trainer.order.add_skip(r["skip_start"], r["skip_end"])
            for p in r.get("positions", ()):
                trainer.order.add_skip(p, p + 1)
        self.ledger.record("rollback", step, **{k: v for k, v in entry.items() if k not in ("step", "positions")},
                           rollbacks=len(self.rollbacks), checkpoint=str(path))
        skipped_what = f"stream positions [{entry['skip_start']}, {skip_end})"
        if found is not None:
            self.ledger.record("culprits", step, **found.ledger_fields())
            skipped_what = f"{len(found.positions)} culprit sample(s) at stream positions {found.positions}"
        trainer.metrics.text(f"stability: step {step}: {count} "
                             f"anomalous steps in a row; rolled back to step {to_step} and skipped {skipped_what}")

    def abort(self, trainer, reason: str) -> None:
        step = trainer.state.step
        steps = [e["step"] for e in self.episode]
        ranges = ", ".join(f"[{e['start']}, {e['end']})" for e in self.episode)
        skipped = ", ".join(f"[{r['skip_start']}, {r['skip_end']})" for r in self.rollbacks) or "none"
        self.ledger.record("abort", step, reason=reason, steps=steps,
                           ranges=[[e["start"], e["end"]] for e in self.episode])
        raise StabilityAbort(
            f"stability: aborted at step {step}: {reason}; anomalous steps {steps} read stream positions "
            f"{ranges} (see `bigtrain inspect {trainer.run_dir} --step N`); windows skipped by earlier "
            f"rollbacks: {skipped}; checkpoints are intact")

    # ------------------------------------------------------------------ bookkeeping
    def counters(self) -> dict:
        """Totals for metrics.jsonl and TensorBoard."""
        return {"skipped": self.skipped, "rollbacks": len(self.rollbacks)}

    def state_dict(self) -> dict:
        return {"detector": self.detector.state_dict(), "episode": [dict(e) for e in self.episode],
                "rollbacks": [dict(r) for r in self.rollbacks], "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.detector.load_state_dict(state["detector"])
        self.episode = [dict(e) for e in state["episode"]]
        self.rollbacks = [dict(r) for r in state["rollbacks"]]
        self.skipped = int(state["skipped"])
