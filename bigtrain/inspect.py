"""``bigtrain inspect RUN_DIR --step N``: the samples step N trained on, decoded.

Nothing about the data is logged per step, and nothing needs to be: a step's
batch depends only on (seed, stream position, skip ledger, batch size), so it
can be *replayed*. We walk the run from step 0 with the resolved config in
``RUN_DIR/config.yaml`` (batch sizes from ``batch_size_at``, so ramp-up is
included) and apply the ledger's events in the order they happened:

* ``rollback`` at step s to step t: the run trained up to s, went back to the
  state it had after step t, and added its ``skips`` to the skip ledger (with every
  range earlier rollbacks skipped: the guard remembers them): the whole window, or
  single positions when the culprit policy found the samples that caused the spike;
* ``culprits`` at step s, just before the rollback it explains: the scores of the
  culprit samples (see ``bigtrain.stability.culprits``), shown next to them;
* ``resume`` at step r: a restarted run went back to the state after step r
  (whatever the crashed process did past its last checkpoint is gone);
* ``spike`` / ``nonfinite`` / ``skip``: mark what happened to that training of the step;
* ``mixture`` (runs with ``data.sources``): a resume with other weights; the event holds the
  whole weight history (:mod:`bigtrain.data.mixture`), which the replay takes from then on.
  The history's first segment is what the run started with, so the replay starts with it
  (``config.yaml`` holds only the newest weights).

With several sources every sample is shown with its source and its draw: ``draw k``
is the source's ``k``-th sample read (its own stream, its own epochs).

A step that was trained more than once (before and after a rollback) is shown
once per *attempt*, oldest first: the attempt that spiked is usually the one a
user wants to read; after a culprit skip the next attempt shows what the step
read instead.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from bigtrain.config import ConfigError, load_config
from bigtrain.data.mixture import Mixture
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
    windows: tuple = ()  # rollback windows known at this point (shared between points, never mutated)


class Replay:
    """The run's history of data positions, rebuilt from its config and ledger."""

    def __init__(self, num_samples, cfg, target: int, history: list | None = None):
        """``num_samples``: the train split's (each source's, for a mixture); ``history``: the
        mixture's first weight segment when it changed since (the first ``mixture`` event's)."""
        self.cfg, self.target = cfg, target
        self.order = SampleOrder(num_samples, cfg.seed, weights=[s.weight for s in cfg.data.sources or []] or None)
        if history:
            self.order.mixture = Mixture([1], history)
        self._skips: list | None = None  # self.order.skips, shared by every point until the ledger changes
        self.now = _Point()
        self.points = {0: self._snapshot()}
        self.attempts: list[Attempt] = []
        self.culprits: dict[int, float] = {}  # stream position -> score, of every culprit skipped

    def _snapshot(self) -> tuple[_Point, list]:
        """O(1) per step however many (single-position) skips the run holds: nothing is copied."""
        if self._skips is None:
            self._skips = self.order.skips
        p = self.now
        return _Point(p.step, p.position, p.samples, p.windows), self._skips

    def _skip(self, windows: tuple) -> None:
        self.now.windows += windows
        for start, end in windows:
            self.order.add_skip(start, end)
        self._skips = None

    def _restore(self, step: int, extra_windows: tuple | None = None) -> None:
        """Back to the state after ``step``: a resume forgets what the run learnt since (the
        checkpoint's guard state is all it has); a rollback (``extra_windows``) keeps it."""
        if step not in self.points:
            raise ConfigError(f"ledger refers to step {step}, which the replay never reached")
        point, skips = self.points[step]
        windows = point.windows if extra_windows is None else self.now.windows + extra_windows
        self.now = _Point(point.step, point.position, point.samples)
        self.order = self.order.with_skips(skips)
        self._skip(windows)
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
        if kind not in ("rollback", "culprits", "resume", "spike", "nonfinite", "skip", "mixture"):
            return
        self.advance(step)
        if kind == "mixture":
            self.order.mixture = Mixture([1], event["segments"])
        elif kind == "rollback":
            self._restore(int(event["to_step"]), tuple((int(a), int(b)) for a, b in event["skips"]))
            self.points[self.now.step] = self._snapshot()  # the rollback re-saves its target with the skips
        elif kind == "culprits":  # the scores behind the single positions the next rollback skips
            self.culprits.update({int(p): float(s) for p, s in zip(event["positions"], event["scores"])})
        elif kind == "resume":
            self._restore(step)
        elif step == self.target and self.attempts and not self.attempts[-1].superseded:
            if kind == "skip":
                self.attempts[-1].skipped = True
            else:
                self.attempts[-1].verdict = kind


def _replay(run_dir: str, step: int, data: str | None):
    """(config, prepared data, train split, replay up to ``step``) of a run directory."""
    from bigtrain.data.splits import open_splits

    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"{run_dir!r} is not a run directory (no config.yaml)")
    overrides = [f"data.path={data}"] if data else []
    cfg = load_config(run / "config.yaml", overrides=overrides)
    if data and cfg.data.sources:
        raise ConfigError(f"--data: {run_dir!r} reads data.sources; edit their paths in {run / 'config.yaml'}")
    if not 1 <= step <= cfg.schedule.max_steps:
        raise ConfigError(f"--step {step}: expected a step in [1, {cfg.schedule.max_steps}]")
    if not Path(cfg.data.path).is_dir():
        raise ConfigError(f"data.path {cfg.data.path!r} (from {run / 'config.yaml'}) does not exist; "
                          "pass --data DIR")
    prepared, train, _ = open_splits(cfg, verify=False)
    seq = cfg.model.seq_len
    events = Ledger(run, enabled=False).events()
    first = next((e["segments"][:1] for e in events if e.get("event") == "mixture"), None)
    replay = Replay(train.sizes(seq) if cfg.data.sources else train.num_samples(seq), cfg, step, first)
    for event in events:
        replay.apply(event)
    replay.advance(step)
    return cfg, prepared, train, replay


def inspect_step(run_dir: str, step: int, data: str | None = None, chars: int = 80) -> dict:
    """Everything ``bigtrain inspect`` prints, as a dict."""
    return _report(run_dir, step, *_replay(run_dir, step, data), chars)


def _report(run_dir: str, step: int, cfg, prepared, train, replay, chars: int) -> dict:
    seq, run = cfg.model.seq_len, Path(run_dir)
    tokenizer = prepared.tokenizer
    names = [s.name for s in cfg.data.sources or []]
    attempts = []
    for a in replay.attempts:
        samples = replay.order.sample_at(a.positions).tolist()
        sources, draws = replay.order.mixture.draw(a.positions)
        rows = []
        for position, sample, source, draw in zip(a.positions, samples, sources.tolist(), draws.tolist()):
            text = tokenizer.decode(train.sample(sample, seq).tolist())
            rows.append({"position": position, "sample": sample, "text": text[:chars] if chars else text,
                         "culprit": replay.culprits.get(position)})
            if names:
                rows[-1].update(source=names[source], draw=draw)
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
            mark = f"  CULPRIT, skipped (score {row['culprit']:.3f})" if row.get("culprit") is not None else ""
            source = f"  {row['source']} draw {row['draw']}" if "source" in row else ""
            lines.append(f"  pos {row['position']:>10}  sample {row['sample']:>9}{source}  "
                         f"{json.dumps(row['text'])}{mark}")
    return "\n".join(lines)


def bisect_step(run_dir: str, step: int, data: str | None = None, chars: int = 80) -> dict:
    """``bigtrain bisect``: score what step ``step`` read last (its newest attempt) under the newest
    committed checkpoint before it, in this process on the CPU, and name the culprits
    (:mod:`bigtrain.stability.culprits`)."""
    import contextlib

    import numpy as np
    import torch

    from bigtrain.checkpoint import committed, load_model
    from bigtrain.parallel.env import DistEnv
    from bigtrain.stability.culprits import choose, score_samples

    replayed = _replay(run_dir, step, data)
    cfg, train = replayed[0], replayed[2]
    report = _report(run_dir, step, *replayed, chars)
    before = [s for s, _ in committed(Path(run_dir) / "checkpoints") if s < step]
    if not before:
        raise ConfigError(f"{run_dir!r} has no committed checkpoint before step {step} to score it with")
    rows = report["attempts"][-1]["samples"]
    positions = np.array([r["position"] for r in rows], dtype=np.int64)
    samples = np.array([r["sample"] for r in rows], dtype=np.int64)
    cpu = DistEnv(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    scores = score_samples(load_model(run_dir, before[-1]), contextlib.nullcontext, cpu, train,
                           cfg.model.seq_len, cfg.batch.micro_size, [(positions, samples)])
    found = choose(scores, positions)
    culprits = set(found.positions) if found else set()
    for row, score in zip(rows, scores.tolist()):
        row.update(score=score, culprit=row["position"] in culprits)
    clean = [r["score"] for r in rows if not r["culprit"]]
    return {"run_dir": report["run_dir"], "step": step, "checkpoint_step": before[-1],
            "attempt": len(report["attempts"]), "median": float(np.median(clean)),
            "culprits": sorted(culprits), "samples": rows}


def format_bisect(report: dict) -> str:
    culprits = [r for r in report["samples"] if r["culprit"]]
    rest = [r["score"] for r in report["samples"] if not r["culprit"]]
    lines = [f"step {report['step']} (attempt {report['attempt']}), scored under the checkpoint of step "
             f"{report['checkpoint_step']}: {len(culprits)} culprit(s) in {len(report['samples'])} samples; "
             f"the others' mean cross-entropy: median {report['median']:.3f}, max {max(rest):.3f} nats/token"]
    for row in culprits:
        lines.append(f"  pos {row['position']:>10}  sample {row['sample']:>9}  score {row['score']:.3f}  "
                     f"{json.dumps(row['text'])}")
    return "\n".join(lines)
