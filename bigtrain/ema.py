"""An exponential moving average (EMA) of the weights, for evaluation and export.

After every ``ema.every``-th step whose update was applied::

    ema <- d**k * ema + (1 - d**k) * theta          (k = ema.every)

where ``d`` is ``ema.decay``, or with ``ema.warmup`` ``min(decay, (1 + n k) / (10 + n k))``
after ``n`` EMA updates (so the first averages forget the random init quickly; ``n k``
counts the optimizer updates they covered). ``d**k`` keeps the time constant, about
``1 / (1 - d)`` steps, whatever ``k`` is; a larger ``k`` only costs fewer passes over
the weights. ``theta`` is the fp32 master of each parameter, so the EMA is fp32 too.

Sharded like the parameters, never whole on a rank that does not hold the whole model:
under FSDP2 the EMA is a clone of each parameter's DTensor (its local shard; DCP
reshards it to any world size on load), under ``backend: none`` a clone of the
parameters. Checkpoints hold it as the backend's ``ema`` entry (``weights`` keyed by
parameter name, and the update count), so a resume, and a rollback, which is a load,
restore it bitwise.

A skipped step never moves the EMA: the step's verdict (``applied``) multiplies the
weight instead of being read on the host, so it may be a bool on the device. The
parameters are finite at every step (an anomalous update is never applied), so
``lerp(ema, theta, 0)`` leaves the EMA exactly as it was.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

from bigtrain.config import EMAConfig


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds: a DTensor's local shard, or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _reshard(model: nn.Module) -> None:
    """Free FSDP2's gathered parameters, so the next forward gathers the shards as they are
    now: a module kept gathered after a forward (the root, the last block) would otherwise
    compute with the weights it gathered before a swap."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


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
    def swapped_in(self, model: nn.Module):
        """The EMA in the parameters for the duration (e.g. an evaluation), the trained
        weights back afterwards, bitwise."""
        _reshard(model)
        self._swap()
        try:
            yield
        finally:
            _reshard(model)
            self._swap()

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
