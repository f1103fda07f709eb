"""The one interface the trainer uses, whatever runs underneath.

A backend owns the wrapped model and the optimizer. The trainer asks it to run a
micro-batch forward and backward, to reduce a number over ranks, to measure the
global gradient norm, and to apply or skip an update; it never branches on
``parallel.backend``. :class:`LocalBackend` (``backend: none``) is the reference
the distributed backends are tested against; with several processes it
all-reduces gradients itself (plain data parallel), which keeps the
single-process path and the 2-rank CPU path one code path.
"""
from __future__ import annotations

import contextlib
import functools
import math
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from bigtrain.config import Config
from bigtrain.model.gpt import GPT, lm_loss
from bigtrain.optim import build_optimizer, set_lr
from bigtrain.checkpoint import dcp_io
from bigtrain.parallel.env import DistEnv


def prepare_blocks(model: GPT, cfg: Config) -> None:
    """Activation checkpointing and ``torch.compile``, per block and in place, so that
    parameter names (and therefore checkpoints and exports) are unchanged."""
    for block in model.blocks:
        if cfg.parallel.activation_checkpointing:
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
        if cfg.parallel.compile:
            block.compile()


class Backend:
    """Base class: the parts every backend shares (autocast, loss, clipping maths)."""

    name = "base"

    def __init__(self, model: GPT, cfg: Config, env: DistEnv):
        self.cfg, self.env = cfg, env
        self.raw_model = model  # the unwrapped GPT (its parameters may be sharded)
        self.model: nn.Module = model
        self.optimizer: torch.optim.Optimizer | None = None

    # -- forward / backward ---------------------------------------------------------
    def autocast(self):
        if self.cfg.parallel.precision == "bf16":
            return torch.autocast(device_type=self.env.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def loss_terms(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self.autocast():
            logits = self.model(inputs)
        return lm_loss(logits, targets, self.cfg.model.z_loss)

    def forward_backward(self, inputs: torch.Tensor, targets: torch.Tensor, scale: float,
                         last: bool) -> torch.Tensor:
        """Run one micro-batch; ``scale`` turns its loss sum into its share of the
        rank's token-weighted mean. Returns the detached cross-entropy share."""
        ce_sum, z_sum = self.loss_terms(inputs, targets)
        self.backward((ce_sum + z_sum) * scale)
        return ce_sum.detach() * scale

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    @torch.no_grad()
    def eval_loss_sum(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        ce_sum, _ = self.loss_terms(inputs, targets)
        return ce_sum.detach()

    # -- reductions --------------------------------------------------------------------
    def mean_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        t = value.detach().float().reshape(1).clone()
        return self.env.all_reduce(t) / self.env.world

    # -- gradients and updates -----------------------------------------------------------
    def grads(self) -> list[torch.Tensor]:
        return [p.grad for p in self.model.parameters() if p.grad is not None]

    def grad_norm(self) -> torch.Tensor:
        """The pre-clip L2 norm over every parameter, shard and rank (same on all ranks).
        A NaN or inf anywhere makes it non-finite everywhere."""
        grads = self.grads()
        if not grads:
            return torch.zeros((), device=self.env.device)
        norms = torch._foreach_norm(grads, 2.0)
        return torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))

    def clip(self, norm: torch.Tensor, max_norm: float) -> float:
        """Scale gradients so their global norm is at most ``max_norm``; returns the factor."""
        if max_norm <= 0 or not math.isfinite(float(norm)):
            return 1.0
        factor = min(1.0, max_norm / (float(norm) + 1e-6))
        if factor < 1.0:
            torch._foreach_mul_(self.grads(), factor)
        return factor

    def step(self, lr: float) -> None:
        set_lr(self.optimizer, lr)
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    def full_parameters(self) -> dict[str, torch.Tensor]:
        """Every parameter whole, fp32, on the CPU, by name; a collective (every rank calls it
        and gets the same tensors) when the backend shards them."""
        return {n: p.detach().float().cpu().clone() for n, p in self.raw_model.named_parameters()}

    # -- checkpoints (torch.distributed.checkpoint; DeepSpeed overrides these) -----------
    def sharded_state(self) -> dict:
        """Model and optimizer as DCP sees them: keyed by parameter name (the optimizer's
        state too, not by position), each rank holding its own shards. So one checkpoint
        loads at any world size, and under either DCP backend (none, fsdp)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict
        model, optim = get_state_dict(self.model, self.optimizer)
        return {"model": model, "optim": optim}

    def save_sharded(self, path: Path) -> None:
        """Write this rank's shards into directory ``path``; every rank calls it."""
        dcp_io.save(self.sharded_state(), Path(path), self.env.distributed)

    def async_save_sharded(self, path: Path, group, stager) -> dcp_io.AsyncSaveResponse:
        """:meth:`save_sharded` in background threads: copy to CPU, then write (see dcp_io)."""
        return dcp_io.async_save(self.sharded_state(), Path(path), self.env.distributed, group, stager)

    def load_sharded(self, path: Path) -> None:
        """Restore model and optimizer from directory ``path``, resharded to this world."""
        from torch.distributed.checkpoint.state_dict import set_state_dict
        state = self.sharded_state()
        dcp_io.load(state, Path(path), self.env.distributed)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


class LocalBackend(Backend):
    """``parallel.backend: none``: one replica per process; gradients are all-reduced
    (averaged) by hand after the last micro-batch when there are several processes."""

    name = "none"

    def __init__(self, model: GPT, cfg: Config, env: DistEnv):
        super().__init__(model.to(env.device), cfg, env)
        prepare_blocks(model, cfg)
        self.optimizer = build_optimizer(self.raw_model, cfg)

    def forward_backward(self, inputs, targets, scale, last):
        out = super().forward_backward(inputs, targets, scale, last)
        if last and self.env.distributed:
            for g in self.grads():
                self.env.all_reduce(g)
                g.div_(self.env.world)
        return out


def build_backend(model: GPT, cfg: Config, env: DistEnv) -> Backend:
    if cfg.parallel.backend == "none":
        return LocalBackend(model, cfg, env)
    if cfg.parallel.backend == "fsdp":
        from bigtrain.parallel.fsdp import FSDPBackend
        return FSDPBackend(model, cfg, env)
    from bigtrain.parallel.deepspeed import DeepSpeedBackend
    return DeepSpeedBackend(model, cfg, env)
