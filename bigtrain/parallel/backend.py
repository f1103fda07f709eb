"""Choosing the backend: ``parallel.backend`` -> its class, and the reference backend.

:class:`LocalBackend` (``backend: none``) is the reference the distributed backends
are tested against; with several processes it all-reduces gradients itself (plain
data parallel), which keeps the single-process path and the 2-rank CPU path one
code path. The recipe itself (:class:`Backend`, :class:`StepStats`) is in
:mod:`bigtrain.parallel.base`; it is importable from here too, the one place
callers need.
"""
from __future__ import annotations

import torch

from bigtrain.config import Config
from bigtrain.model.gpt import GPT
from bigtrain.model.init import on_device
from bigtrain.optim import build_optimizer
from bigtrain.parallel.base import Backend, StepStats, prepare_blocks
from bigtrain.parallel.deepspeed import DeepSpeedBackend
from bigtrain.parallel.env import DistEnv
from bigtrain.parallel.fsdp import FSDPBackend

__all__ = ["Backend", "StepStats", "LocalBackend", "backend_class", "build_backend"]


class LocalBackend(Backend):
    """``parallel.backend: none``: one replica per process; gradients are all-reduced
    (averaged) by hand after the last micro-batch when there are several processes."""

    name = "none"

    def __init__(self, model: GPT, cfg: Config, env: DistEnv):
        super().__init__(on_device(model, cfg, env.device), cfg, env)
        prepare_blocks(model, cfg, env.device)
        self.optimizer = build_optimizer(self.raw_model, cfg)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        loss.backward()
        if last and self.env.distributed:
            for g in self.grads():
                self.env.all_reduce(g)
                g.div_(self.env.world)


def backend_class(name: str) -> type[Backend]:
    """The class of ``parallel.backend: name``, imported but not built: its capability
    attributes can be read before any process group or model exists."""
    return {"none": LocalBackend, "fsdp": FSDPBackend, "deepspeed": DeepSpeedBackend}[name]


def build_backend(model: GPT, cfg: Config, env: DistEnv) -> Backend:
    return backend_class(cfg.parallel.backend)(model, cfg, env)
