"""``profile.steps: [a, b]``: a torch profiler trace of steps a..b, on every rank.

What it writes, under ``RUN_DIR/profile/``:

* ``rank<R>.steps<a>-<b>.pt.trace.json``: a Chrome trace (Perfetto, chrome://tracing, or
  TensorBoard's profiler plugin, which reads ``*.pt.trace.json`` under a log dir). Each
  step is a range ``bigtrain/step N``, and inside it the step's phases
  (:mod:`bigtrain.phases`: ``bigtrain/data``, ``bigtrain/forward_backward``, ...), so the
  trace reads as the loop does. On CUDA the kernels and copies are recorded too.
* on CUDA, ``rank<R>.steps<a>-<b>.memory.pickle``: the allocator's history over those steps
  (``torch.cuda.memory._dump_snapshot``; drag it onto https://pytorch.org/memory_viz).

Every rank writes its own files: a straggler or an uneven collective shows up only when
ranks can be compared. The trainer calls :meth:`StepProfiler.at` once per step with the
number of steps done; off (the default) that is one attribute test. Step ``N``'s range runs
from the top of step N to the top of step N+1, so the checkpoint or eval that follows a step
is inside it. A rollback inside the window shows the replayed steps again; one after the
window does not profile again.
"""
from __future__ import annotations

from pathlib import Path

import torch


class StepProfiler:
    def __init__(self, steps: tuple[int, int] | None, run_dir: str | Path, rank: int, device: torch.device):
        self.pending = steps is not None  # the only thing a step looks at when profiling is off
        self.first, self.last = steps or (0, 0)
        self.cuda = device.type == "cuda"
        self.stem = Path(run_dir) / "profile" / f"rank{rank}.steps{self.first}-{self.last}"
        self.prof: torch.profiler.profile | None = None
        self.range: torch.profiler.record_function | None = None

    def at(self, done: int) -> None:
        """Called at the top of every step, ``done`` steps finished."""
        if not self.pending:
            return
        if self.prof is None and self.first - 1 <= done < self.last:  # (a run resumed inside the window: from here)
            self._start()
        if self.prof is not None:
            self._end_range()
            if done >= self.last:
                self.close()
            else:
                self.range = torch.profiler.record_function(f"bigtrain/step {done + 1}")
                self.range.__enter__()

    def _start(self) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            # the allocator's history (stacks of every alloc/free) for the memory snapshot
            torch.cuda.memory._record_memory_history(max_entries=1_000_000)
        self.prof = torch.profiler.profile(activities=activities, record_shapes=True, profile_memory=True)
        self.prof.start()

    def _end_range(self) -> None:
        if self.range is not None:
            self.range.__exit__(None, None, None)
            self.range = None

    def close(self) -> None:
        """Stop and write the files (also when the run ends or stops inside the window)."""
        if self.prof is None:
            return
        self._end_range()
        if self.cuda:
            torch.cuda.synchronize()
        self.prof.stop()
        self.stem.parent.mkdir(parents=True, exist_ok=True)
        self.prof.export_chrome_trace(f"{self.stem}.pt.trace.json")
        if self.cuda:
            torch.cuda.memory._dump_snapshot(f"{self.stem}.memory.pickle")
            torch.cuda.memory._record_memory_history(enabled=None)
        self.prof, self.pending = None, False
