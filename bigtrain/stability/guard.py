"""What to do about an anomalous step: skip it, roll back past it, or stop.

The PaLM recipe, decided identically on every rank. The guard only *decides*; the
training loop carries the decision out (:mod:`bigtrain.stability.recovery`).

* **skip**: a step the detector calls ``spike`` or ``nonfinite`` is not applied
  (:attr:`Verdict.apply` is False): the loop discards its gradients, so parameters,
  optimizer moments and the optimizer's step count stay exactly as they were.
  (Masking the update by multiplying with 0 would not do: 0 * NaN is NaN.) So no
  checkpoint can ever hold a non-finite value. The skipped step still consumes its
  data and counts toward ``schedule.max_steps``, but not toward the LR schedule.
* **rollback**: ``stability.max_consecutive`` anomalous steps in a row (an
  *episode*) mean the trouble persists. :meth:`Guard.after_step` returns
  :data:`ROLLBACK` with the episode; the loop reloads the newest committed
  checkpoint older than the episode's first step and adds the data window in
  between to the skip ledger: replaying the same data from an earlier state is
  what spiked. While an episode is open, the loop pins that checkpoint
  (``Checkpointer.protect``) so that retention cannot delete it. A rollback needs a
  checkpoint: with ``checkpoint.every: 0`` there is none to go back to (the run
  says so when it starts) and the first episode aborts.
* **abort**: :data:`ABORT` when an episode comes while the current *chain* of
  rollbacks already holds ``stability.max_rollbacks`` of them. A chain starts at
  the first episode that rolls back; every later rollback belongs to it until the
  replay has made ``stability.window`` normal steps numbered from the step where the
  chain's first episode began; then the chain ends and the count starts again. So
  separate bad-data windows far apart each get their rollbacks, while one that keeps
  coming back after a rollback stops the run. The loop writes ``RUN_DIR/ABORTED``
  and raises :class:`StabilityAbort` (exit status 3); the run stays aborted.

The verdict is taken on the device (:meth:`Guard.judge`, from the detector's device
state), so the skip it decides needs no host sync; the host learns the verdict a step
later (:meth:`StepVerdict.read` of the values the loop staged) and only then takes the
decisions below (:meth:`Guard.after_step`): an anomalous update was never applied, so
deciding a rollback one step late loses nothing but that step's compute.

Every decision is appended to ``RUN_DIR/ledger.jsonl``. The guard's state goes into
every checkpoint, so a resumed run decides alike. A rollback restores the detector
and the episode from the checkpoint (they belong to that model state) but keeps what
the run has learnt since (:meth:`Guard.rolled_back`): its rollbacks, their chain and
the count of skipped updates.

``stability.enabled: false`` turns off spike detection, rollback and abort; a
non-finite update is still never applied.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from bigtrain.config import StabilityConfig
from bigtrain.ledger import Ledger
from bigtrain.parallel.env import DistEnv
from bigtrain.stability.detector import KINDS, NONFINITE, OK, SPIKE, SpikeDetector, spike_details
from bigtrain.stability.host_detector import HostSpikeDetector

GO_ON, ROLLBACK, ABORT = "go on", "roll back", "abort"


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


@dataclass(frozen=True)
class StepVerdict:
    """A verdict as the device holds it (0-d tensors, nothing read by the host)."""
    code: torch.Tensor        # index into detector.KINDS
    loss: torch.Tensor
    grad_norm: torch.Tensor
    details: torch.Tensor     # (loss_z, expected, spread) of a spike

    SIZE = 6  # len(values())

    @property
    def apply(self) -> torch.Tensor:
        """0-d bool on the device: whether the update may be applied."""
        return self.code == KINDS.index(OK)

    def values(self) -> torch.Tensor:
        """Everything the host needs, as one float64 vector to copy back in one go."""
        return torch.cat([self.code.reshape(1), self.loss.reshape(1), self.grad_norm.reshape(1),
                          self.details]).double()  # (cat promotes each part to the widest dtype: one copy)

    @staticmethod
    def from_values(values: list[float]) -> Verdict:
        """The host's :class:`Verdict` from :meth:`values` read back."""
        kind = KINDS[int(values[0])]
        return Verdict(kind, values[1], values[2], spike_details(values[3:6]) if kind == SPIKE else {})

    def read(self) -> Verdict:
        """:meth:`from_values` of this verdict, read now (a host sync; tests and tools)."""
        return self.from_values(self.values().tolist())


@dataclass(frozen=True)
class Decision:
    """What the loop must do after a step. ``episode``: the anomalous steps in a row, each
    ``{"step", "start", "end", "size"}`` (its stream window and global batch size)."""
    action: str = GO_ON
    episode: tuple = ()
    reason: str = ""

    @property
    def first_step(self) -> int:
        return self.episode[0]["step"]


class Guard:
    def __init__(self, cfg: StabilityConfig, env: DistEnv, ledger: Ledger):
        self.cfg, self.env, self.ledger = cfg, env, ledger
        # the rule on the device (no host sync on CUDA); on the CPU, where reading costs nothing,
        # the same rule on host floats, ten times cheaper (stability/host_detector.py)
        rule = HostSpikeDetector if env.device.type == "cpu" else SpikeDetector
        self.detector = rule.from_config(cfg, env.device)
        self.episode: list[dict] = []    # the open episode: consecutive anomalous steps
        self.chain: dict | None = None   # {"start", "rollbacks", "normal"}: the rollbacks that count together
        self.rollbacks: list[dict] = []  # every rollback of the run, for the abort message
        self.skipped = 0                 # updates not applied, over the whole run
        self.last: StepVerdict | None = None

    # ------------------------------------------------------------------ per step
    def judge(self, loss, grad_norm, nonfinite) -> StepVerdict:
        """The verdict on a step, before its update, on the device. ``nonfinite``: some rank
        saw a NaN/inf (:class:`~bigtrain.parallel.base.StepStats` has it OR-reduced over
        ranks), so a NaN that only one rank sees still stops the update on every rank.
        Host numbers are accepted too (tests, offline replays)."""
        device = self.env.device
        loss, grad_norm = (torch.as_tensor(v, dtype=torch.float64, device=device) for v in (loss, grad_norm))
        nonfinite = torch.as_tensor(nonfinite, device=device)
        if self.cfg.enabled:
            code, details = self.detector.verdict(loss, grad_norm, nonfinite)
        else:
            code = torch.where(nonfinite, KINDS.index(NONFINITE), KINDS.index(OK))
            details = torch.zeros(3, device=device)
        self.last = StepVerdict(code, loss, grad_norm, details)
        return self.last

    def after_step(self, step: int, start: int, end: int, size: int, verdict: Verdict | None = None) -> Decision:
        """Record the verdict of ``step`` (it read stream positions ``[start, end)``, a global
        batch of ``size``) and decide what the loop does next. ``verdict``: as the host
        learnt it (default: read :attr:`last` now)."""
        v = verdict or self.last.read()
        if v.apply:
            self.episode = []
            if self.chain is not None and step >= self.chain["start"]:
                self.chain["normal"] += 1
                if self.chain["normal"] >= self.cfg.window:
                    self.chain = None    # the replay is well past where the chain began
            return Decision()
        where = {"start": int(start), "end": int(end)}
        self.ledger.record(v.kind, step, loss=v.loss, grad_norm=v.grad_norm, **v.details, **where)
        self.ledger.record("skip", step, **where)
        self.skipped += 1
        if not self.cfg.enabled:
            return Decision()
        self.episode.append({"step": step, **where, "size": int(size)})
        if len(self.episode) < self.cfg.max_consecutive:
            return Decision()
        done = self.chain["rollbacks"] if self.chain else 0
        if done >= self.cfg.max_rollbacks:
            return Decision(ABORT, tuple(self.episode),
                            f"anomalies persisted after {done} rollback(s) in a row "
                            f"(stability.max_rollbacks={self.cfg.max_rollbacks})")
        return Decision(ROLLBACK, tuple(self.episode))

    @property
    def open_since(self) -> int | None:
        """The first step of the open episode, or None."""
        return self.episode[0]["step"] if self.episode else None

    # ------------------------------------------------------------------ outcomes
    def rolled_back(self, memory: dict, decision: Decision, to_step: int, skips: list) -> dict:
        """After the loop reloaded the checkpoint of ``to_step`` (which restored this guard too):
        keep what the run learnt since, taken as ``memory = state_dict()`` before the load,
        and count this rollback in its chain. Returns the rollback's record."""
        chain = memory["chain"] or {"start": decision.first_step, "rollbacks": 0}
        self.chain = {"start": chain["start"], "rollbacks": chain["rollbacks"] + 1, "normal": 0}
        entry = {"step": decision.episode[-1]["step"], "to_step": to_step, "skips": [list(s) for s in skips]}
        self.rollbacks = [dict(r) for r in memory["rollbacks"]] + [entry]
        self.skipped = memory["skipped"]
        self.episode = []
        return entry

    def abort(self, step: int, decision: Decision, reason: str) -> StabilityAbort:
        """Record the abort and return the exception (with everything a person needs) to raise."""
        episode = decision.episode
        steps = [e["step"] for e in episode]
        ranges = ", ".join(f"[{e['start']}, {e['end']})" for e in episode)
        skipped = ", ".join(f"[{a}, {b})" for r in self.rollbacks for a, b in r["skips"]) or "none"
        self.ledger.record("abort", step, reason=reason, steps=steps, ranges=[[e["start"], e["end"]] for e in episode])
        return StabilityAbort(
            f"stability: aborted at step {step}: {reason}; anomalous steps {steps} read stream positions "
            f"{ranges} (see `bigtrain inspect {self.ledger.path.parent} --step N`); windows skipped by "
            f"earlier rollbacks: {skipped}; checkpoints are intact")

    # ------------------------------------------------------------------ bookkeeping
    def counters(self) -> dict:
        """Totals for metrics.jsonl and TensorBoard."""
        return {"skipped": self.skipped, "rollbacks": len(self.rollbacks)}

    def state_dict(self) -> dict:
        return {"detector": self.detector.state_dict(), "episode": [dict(e) for e in self.episode],
                "chain": dict(self.chain) if self.chain else None,
                "rollbacks": [dict(r) for r in self.rollbacks], "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.detector.load_state_dict(state["detector"])
        self.episode = [dict(e) for e in state["episode"]]
        self.chain = dict(state["chain"]) if state["chain"] else None
        self.rollbacks = [dict(r) for r in state["rollbacks"]]
        self.skipped = int(state["skipped"])
