"""No host sync inside a training step.

The real loop (``Trainer.fit``) reads device values only where its host work needs them:
one staged vector per step, a step late (bigtrain/inflight.py), and everything at once on
logging steps. On the CPU this test counts the host's reads of tensor values per loop
iteration (``item``/``float``/``bool``/``int`` as the dispatcher sees them, ``tolist``,
``numpy``); where CUDA exists it also runs the loop on the GPU with
``torch.cuda.set_sync_debug_mode("error")`` around the quiet steps, so that any
synchronising call (a read, a blocking copy, a stream sync) raises there.
"""
from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bigtrain.parallel.env import DistEnv
from bigtrain.stability import guard
from bigtrain.stability.detector import SpikeDetector
from bigtrain.trainer import Trainer
from helpers import tiny_config

LOG_EVERY, STEPS = 4, 13


class HostReads(TorchDispatchMode):
    """Counts scalar reads of tensors (``aten._local_scalar_dense``: item, float, int, bool)."""

    def __init__(self):
        super().__init__()
        self.scalars = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.scalars += 1
        return func(*args, **(kwargs or {}))


def run_counting(cfg, device: torch.device, monkeypatch) -> list[dict]:
    """Fit ``cfg`` on ``device``; the reads of each loop iteration (iteration s takes step s's batch).
    On CUDA, iterations of steps that need no values run under sync debug mode "error". On the
    CPU too the guard judges by the device rule here (a CPU run's own guard reads the loss on
    the host, where that is free: bigtrain/stability/host_detector.py), so that this counts
    the reads of the code path a CUDA step takes."""
    monkeypatch.setattr(guard, "HostSpikeDetector", SpikeDetector)
    trainer = Trainer(cfg, DistEnv(rank=0, world=1, local_rank=0, device=device))
    reads = HostReads()
    bulk = {"n": 0}
    for name in ("tolist", "numpy"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            bulk["n"] += 1
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    iterations, get = [], trainer.loader.get

    def marked_get(*args, **kwargs):
        if device.type == "cuda":  # the loader's own call is not a sync: a pinned, non-blocking copy
            torch.cuda.set_sync_debug_mode("default")
        iterations.append({"scalars": reads.scalars, "bulk": bulk["n"]})
        batch = get(*args, **kwargs)
        if device.type == "cuda" and not trainer.needs_values(len(iterations)):
            torch.cuda.set_sync_debug_mode("error")
        return batch

    trainer.loader.get = marked_get
    try:
        with reads:
            trainer.fit()
    finally:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
        trainer.close()
    iterations.append({"scalars": reads.scalars, "bulk": bulk["n"]})
    return [{k: b[k] - a[k] for k in a} for a, b in zip(iterations, iterations[1:])]


def test_a_step_reads_nothing_but_the_previous_steps_staged_values(prose_char, tmp_path, monkeypatch):
    devices = [torch.device("cpu")] + ([torch.device("cuda", 0)] if torch.cuda.is_available() else [])
    for device in devices:
        cfg = tiny_config(prose_char, tmp_path / device.type, logging__every=LOG_EVERY, schedule__max_steps=STEPS,
                          eval__batches=0, checkpoint__resume="never")
        with monkeypatch.context() as patches:
            per_step = run_counting(cfg, device, patches)
        assert len(per_step) == STEPS  # the last iteration ends after the final save
        quiet = [s for s in range(1, STEPS) if s % LOG_EVERY]
        for s in quiet:
            late = 0 if s == 1 or (s - 1) % LOG_EVERY == 0 else 1  # a logged step was read in its own iteration
            assert per_step[s - 1] == {"scalars": 0, "bulk": late}, (device, s, per_step)
        logged = [per_step[s - 1] for s in range(LOG_EVERY, STEPS, LOG_EVERY)]
        assert all(r["bulk"] >= 1 for r in logged)  # the count sees reads where they are made


def test_a_sync_that_crept_in_is_counted(prose_char, tmp_path, monkeypatch):
    """The counter above is not blind: one ``float(loss)`` per step shows up in every iteration."""
    cfg = tiny_config(prose_char, tmp_path, logging__every=LOG_EVERY, schedule__max_steps=6, eval__batches=0)
    original = Trainer.train_step

    def with_a_read(self, batch):
        result = original(self, batch)
        float(result["loss"])
        return result
    monkeypatch.setattr(Trainer, "train_step", with_a_read)
    with contextlib.ExitStack():
        per_step = run_counting(cfg, torch.device("cpu"), monkeypatch)
    assert all(r["scalars"] >= 1 for r in per_step)
