"""``bigtrain inspect RUN_DIR --step N``: the samples step N trained on, decoded.

Nothing about the data is logged per step, and nothing needs to be: a step's
batch depends only on (seed, stream position, skip ledger, batch size), so it
can be *replayed*. We walk the run from step 0 with the resolved config in
``RUN_DIR/config.yaml`` (batch sizes from ``batch_size_at``, so ramp-up is
included) and apply the ledger's events in the order they happened:

* ``rollback`` at step s to step t: the run trained up to s, went back to the
  state it had after step t, and added the skipped window to the skip ledger;
* ``resume`` at step r: a restarted run went back to the state after step r
  (whatever the crashed process did past its last checkpoint is gone);
* ``spike`` / ``nonfinite`` / ``skip``: mark what happened to that training of the step.

A step that was trained more than once (before and after a rollback) is shown
once per *attempt*, oldest first: the attempt that spiked is usually the one a
user wants to read.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from bigtrain.config import ConfigError, load_config
from bigtrain.data.order import SampleOrder, batch_size_at
from bigtrain.ledger import Ledger


@dataclass
class Attempt:
    """One training of the step: the stream positions it read and what the guard said."""
    start: int
    end: int                  # the stream position after the batch
    positions: list[int]
    verdict: str = "ok"
    skipped: bool = False
    superseded: bool = False  # a rollback or a resume sent the run back before it


@dataclass
class _Point:
    """Where the replay stands after a step (what a checkpoint at that step would hold)."""
    step: int = 0
    position: int = 0
    samples: int = 0
    windows: list = field(default_factory=list)  # rollback windows known at this point


class Replay:
    """The run's history of data positions, rebuilt from its config and ledger."""

    def __init__(self, num_samples: int, cfg, target: int):
        self.cfg, self.target = cfg, target
        self.order = SampleOrder(num_samples, cfg.seed)
        self.now = _Point()
        self.points = {0: self._snapshot()}
        self.attempts: list[Attempt] = []

    def _snapshot(self) -> tuple[_Point, list]:
        p = self.now
        return _Point(p.step, p.position, p.samples, list(p.windows)), self.order.skips

    def _restore(self, step: int, extra_window: tuple[int, int] | None = None) -> None:
        if step not in self.points:
            raise ConfigError(f"ledger refers to step {step}, which the replay never reached")
        point, skips = self.points[step]
        self.now = _Point(point.step, point.position, point.samples, list(point.windows))
        if extra_window is not None:
            self.now.windows.append(extra_window)
        self.order = SampleOrder(self.order.num_samples, self.order.seed, skips)
        for start, end in self.now.windows:
            self.order.add_skip(start, end)
        if step < self.target:
            for a in self.attempts:
                a.superseded = True

    def advance(self, to_step: int) -> None:
        """Train (on paper) until the step counter reads ``to_step``."""
        while self.now.step < to_step:
            size = batch_size_at(self.now.samples, self.cfg.batch)
            positions, nxt = self.order.next_batch(self.now.position, size)
            self.now.step += 1
            if self.now.step == self.target:
                self.attempts.append(Attempt(self.now.position, int(nxt), positions.tolist()))
            self.now.position, self.now.samples = nxt, self.now.samples + size
            self.points[self.now.step] = self._snapshot()

    def apply(self, event: dict) -> None:
        kind, step = event.get("event"), int(event.get("step", 0))
        if kind not in ("rollback", "resume", "spike", "nonfinite", "skip"):
            return
        self.advance(step)
        if kind == "rollback":
            self._restore(int(event["to_step"]), (int(event["skip_start"]), int(event["skip_end"])))
            self.points[self.now.step] = self._snapshot()  # the rollback re-saves its target with the skip
        elif kind == "resume":
            self._restore(step)
        elif step == self.target and self.attempts and not self.attempts[-1].superseded:
            if kind == "skip":
                self.attempts[-1].skipped = True
            else:
                self.attempts[-1].verdict = kind


def inspect_step(run_dir: str, step: int, data: str | None = None, chars: int = 80) -> dict:
    """Everything ``bigtrain inspect`` prints, as a dict."""
    from bigtrain.data.splits import open_splits

    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"{run_dir!r} is not a run directory (no config.yaml)")
    overrides = [f"data.path={data}"] if data else []
    cfg = load_config(run / "config.yaml", overrides=overrides)
    if not 1 <= step <= cfg.schedule.max_steps:
        raise ConfigError(f"--step {step}: expected a step in [1, {cfg.schedule.max_steps}]")
    if not Path(cfg.data.path).is_dir():
        raise ConfigError(f"data.path {cfg.data.path!r} (from {run / 'config.yaml'}) does not exist; "
                          "pass --data DIR")
    prepared, train, _ = open_splits(cfg, verify=False)
    seq = cfg.model.seq_len
    replay = Replay(train.num_samples(seq), cfg, step)
    for event in Ledger(run, enabled=False).events():
        replay.apply(event)
    replay.advance(step)

    tokenizer = prepared.tokenizer
    attempts = []
    for a in replay.attempts:
        samples = replay.order.sample_at(a.positions).tolist()
        rows = []
        for position, sample in zip(a.positions, samples):
            text = tokenizer.decode(train.sample(sample, seq).tolist())
            rows.append({"position": position, "sample": sample, "text": text[:chars] if chars else text})
        attempts.append({"start": a.start, "end": a.end,
                         "batch_size": len(a.positions), "verdict": a.verdict, "skipped": a.skipped,
                         "superseded": a.superseded, "samples": rows})
    return {"run_dir": str(run), "step": step, "attempts": attempts}


def format_report(report: dict) -> str:
    lines = []
    n = len(report["attempts"])
    for i, a in enumerate(report["attempts"], 1):
        notes = [a["verdict"]] + (["update skipped"] if a["skipped"] else []) + \
                (["rolled back / resumed past"] if a["superseded"] else [])
        lines.append(f"step {report['step']}, attempt {i} of {n}: {a['batch_size']} samples, stream positions "
                     f"{a['start']}..{a['end'] - 1} ({', '.join(notes)})")
        for row in a["samples"]:
            lines.append(f"  pos {row['position']:>10}  sample {row['sample']:>9}  {json.dumps(row['text'])}")
    return "\n".join(lines)
