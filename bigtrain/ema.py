"""An exponential moving average (EMA) of the weights, for evaluation and export.

After every step whose number is a multiple of ``k = ema.every`` and whose update was
applied (a skipped step there is not made up later: the EMA waits for the next multiple)::

    ema <- d**k * ema + (1 - d**k) * theta          (k = ema.every)

where ``d`` is ``ema.decay``, or with ``ema.warmup`` ``min(decay, (1 + n k) / (10 + n k))``
after ``n`` EMA updates (so the first averages forget the random init quickly; ``n k``
counts the optimizer updates they covered). ``d**k`` keeps the time constant, about
``1 / (1 - d)`` steps, whatever ``k`` is; a larger ``k`` only costs fewer passes over
the weights. ``theta`` is the fp32 master of each parameter, so the EMA is fp32 too.

Sharded like the parameters, never whole on a rank that does not hold the whole model
(``Backend.ema_targets``): under FSDP2 a clone of each parameter's DTensor (its local
shard; DCP reshards it to any world size on load), under ``backend: none`` a clone of
the parameters, under DeepSpeed ZeRO-1/2/3 a clone of this rank's flat fp32 master
partitions. DCP checkpoints hold it as the backend's ``ema`` entry (``weights`` keyed by
parameter name, and the update count); DeepSpeed's as ``ema-<rank>.pt`` files (below).
A resume, and a rollback, which is a load, restore it bitwise; a checkpoint without one
(``ema.decay`` was 0) starts it at the loaded weights.

A skipped step never moves the EMA: the step's verdict (``applied``) multiplies the
weight instead of being read on the host, so it may be a bool on the device. The
parameters are finite at every step (an anomalous update is never applied), so
``lerp(ema, theta, 0)`` leaves the EMA exactly as it was.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from bigtrain.config import ConfigError, EMAConfig


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds: a DTensor's local shard, or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


class EMA:
    """The EMA of ``targets`` ({parameter name: this rank's fp32 master}, DTensors allowed)."""

    def __init__(self, targets: dict[str, torch.Tensor], cfg: EMAConfig, device: torch.device):
        self.names = list(targets)
        self.targets = list(targets.values())
        self.weights = [t.detach().clone() for t in self.targets]
        self.every, self.decay, self.warmup = cfg.every, cfg.decay, cfg.warmup
        self.count = torch.zeros((), dtype=torch.int64, device=device)  # EMA updates applied
        # without warm-up the weight never changes: one device scalar, made once
        self.step_weight = torch.tensor(1.0 - cfg.decay ** cfg.every, dtype=torch.float32, device=device)

    def _locals(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return [_local(w) for w in self.weights], [_local(t).detach() for t in self.targets]

    @torch.no_grad()
    def update(self, step: int, applied) -> None:
        """After ``step`` (1-based); ``applied``: whether its update was applied (a bool, or a
        0-d bool tensor on the device, never read on the host)."""
        if step % self.every or applied is False:
            return
        weight = self.step_weight
        if self.warmup:
            covered = (self.count * self.every).float()
            decay = torch.clamp((1 + covered) / (10 + covered), max=self.decay) ** self.every
            weight = 1 - decay
        if applied is not True:
            weight = weight * applied
            self.count += applied
        else:
            self.count += 1
        mine, theirs = self._locals()
        torch._foreach_lerp_(mine, theirs, [weight] * len(mine))  # a tensor weight: no host sync

    @torch.no_grad()
    def reset(self) -> None:
        """Start the average at the current weights (a checkpoint without an EMA was loaded)."""
        mine, theirs = self._locals()
        torch._foreach_copy_(mine, theirs)
        self.count.zero_()

    def state_dict(self) -> dict:
        """For the backend's sharded checkpoint entry: the live tensors, which DCP loads in place."""
        return {"weights": dict(zip(self.names, self.weights)), "updates": self.count}

    @contextlib.contextmanager
    def swapped_in(self, backend):
        """The EMA in ``backend``'s weights for the duration (e.g. an evaluation), the trained
        weights back afterwards, bitwise."""
        self._swap()
        backend.ema_refresh()
        try:
            yield
        finally:
            self._swap()
            backend.ema_refresh()

    @torch.no_grad()
    def _swap(self) -> None:
        for mine, theirs in zip(*self._locals()):
            kept = theirs.clone()  # one tensor at a time: the extra memory is the largest parameter
            theirs.copy_(mine)
            mine.copy_(kept)


def attach_ema(backend, cfg: EMAConfig, device: torch.device) -> EMA | None:
    """The run's EMA (None when ``ema.decay`` is 0), held by ``backend`` so that its
    checkpoints carry it."""
    if cfg.decay == 0:
        return None
    backend.ema = EMA(backend.ema_targets(), cfg, device)
    return backend.ema


# ---------------------------------------------------------------- DeepSpeed's EMA files

def partition_file(rank: int) -> str:
    return f"ema-{rank:05d}.pt"


def save_partitions(path: Path, rank: int, ema: EMA, fragments: dict[str, tuple[int, int, int, int]]) -> None:
    """This rank's EMA of its ZeRO master partitions into checkpoint directory ``path``, with
    ``fragments``: parameter name -> (partition, start in it, numel, start in the flattened
    parameter), which is all :func:`consolidate` needs to rebuild whole tensors without DeepSpeed."""
    torch.save({"partitions": [w.detach().cpu() for w in ema.weights], "updates": ema.count.cpu(),
                "fragments": fragments}, Path(path) / partition_file(rank))


def load_partitions(path: Path, rank: int, ema: EMA) -> bool:
    """Restore this rank's EMA from ``path``; False when that checkpoint holds none."""
    file = Path(path) / partition_file(rank)
    if not file.is_file():
        return False
    saved = torch.load(file, weights_only=True)
    with torch.no_grad():
        torch._foreach_copy_(ema.weights, [t.to(w.device) for t, w in zip(saved["partitions"], ema.weights)])
        ema.count.copy_(saved["updates"])
    return True


def consolidate(path: Path, shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor] | None:
    """Whole EMA tensors (fp32, CPU) from every rank's file in ``path``, or None when there are none."""
    files = sorted(Path(path).glob("ema-*.pt"))
    if not files:
        return None
    flat = {name: torch.zeros(shape.numel()) for name, shape in shapes.items()}
    covered = dict.fromkeys(shapes, 0)
    for file in files:
        saved = torch.load(file, weights_only=True)
        for name, (part, start, numel, offset) in saved["fragments"].items():
            flat[name][offset:offset + numel] = saved["partitions"][part][start:start + numel]
            covered[name] += numel
    if missing := [name for name, shape in shapes.items() if covered[name] != shape.numel()]:
        raise ConfigError(f"checkpoint {str(path)!r}: its EMA files cover {covered[missing[0]]} of the "
                          f"{shapes[missing[0]].numel()} elements of {missing[0]}")
    return {name: flat[name].view(shape) for name, shape in shapes.items()}
