"""Named phases of a training step, for the profiler and the overhead benchmark.

``with phase("forward_backward"): ...`` labels a region of the step. The labels are
``torch.profiler.record_function`` ranges, so they appear in a profiler trace (and
cost next to nothing when no profiler is recording). The names are fixed so that a
trace, ``bench/overhead.py`` and the docs speak of the same things:

    data              reading the next batch (the loader's queue)
    forward_backward  every micro-batch's forward and backward
    reduce            loss and gradient-norm reductions over ranks
    guard             the spike/NaN verdict and what follows from it
    optimizer         clip and optimizer step (or discarding the gradients)
    checkpoint        saving (and waiting for) a checkpoint
    eval              evaluation
    log               metrics, TensorBoard, progress
"""
from __future__ import annotations

import torch

PHASES = ("data", "forward_backward", "reduce", "guard", "optimizer", "checkpoint", "eval", "log")


def phase(name: str) -> torch.profiler.record_function:
    """A labelled range of the step; ``name`` is one of :data:`PHASES`."""
    if name not in PHASES:
        raise ValueError(f"unknown phase {name!r}; expected one of {PHASES}")
    return torch.profiler.record_function(f"bigtrain/{name}")
