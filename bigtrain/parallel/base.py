"""The training-step recipe every backend shares, and what a backend declares it can do.

A backend owns the wrapped model and the optimizer, and the training step (as
OLMo-core's TrainModule does): :meth:`Backend.measure` runs every micro-batch
forward and backward and returns the global loss and gradient norm;
:meth:`Backend.update` clips and applies the update; :meth:`Backend.discard` drops
the gradients of a step that must not be applied. The trainer, preflight, anomaly
tracing and the benchmarks all take their steps through these three, so there is
one recipe. A subclass changes only the pieces that differ (how a micro-batch's
backward reduces gradients, how the norm is measured over shards, how the optimizer
steps). What a backend can do is declared in its capability attributes, readable
before it is built (:func:`bigtrain.parallel.backend.backend_class`), so nothing
outside this package compares backend names.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from bigtrain.config import Config
from bigtrain.model.gpt import GPT, lm_loss
from bigtrain.optim import set_lr
from bigtrain.checkpoint import dcp_io
from bigtrain.parallel.env import DistEnv
from bigtrain.parallel.recompute import checkpoint_blocks
from bigtrain.parallel.tp import vocab_logsumexp
from bigtrain.phases import phase


def prepare_blocks(model: GPT, cfg: Config, device: torch.device) -> None:
    """Activation checkpointing (bigtrain/parallel/recompute.py) and ``torch.compile``, per
    block and in place, so that parameter names (and therefore checkpoints and exports) are unchanged.
    ``parallel.compile: auto`` compiles on CUDA, and on the CPU (``device``, where the model runs)
    for long runs of models from 10M parameters on (:meth:`ParallelConfig.compiles`); the optimizer
    step is never compiled: bench/compile.py measured torch.compile's AdamW 1.7-1.9x slower than
    the fused one on this CPU, after 18-173 s of compiling."""
    checkpoint_blocks(model.blocks, cfg.parallel.activation_checkpointing, cfg.parallel.checkpoint_every)
    if cfg.parallel.compiles(device.type, cfg.schedule.max_steps, model.num_params(non_embedding=True)):
        for block in model.blocks:
            block.compile()


@dataclass
class StepStats:
    """What :meth:`Backend.measure` found, before anything is applied: 0-d tensors on the
    device, the same on every rank, none of them read by the host (no sync)."""
    loss: torch.Tensor       # token-weighted mean CE over the whole global batch
    grad_norm: torch.Tensor  # pre-clip global L2 norm over every shard and rank
    nonfinite: torch.Tensor  # bool: some rank saw a NaN/inf in its loss or gradients
    agreed: torch.Tensor | None = None  # the ``agree`` values, summed over ranks


class Backend:
    """Base class: the step recipe and the parts every backend shares (autocast, loss, clipping maths)."""

    name = "base"
    # Capabilities, declared so that callers ask instead of comparing names.
    reshards_checkpoints = True   # its checkpoints load at any world size (DCP)
    has_local_grads = True        # per-parameter ``.grad`` is readable (faults.nan_at, detail metrics)
    async_checkpoint = True       # supports :meth:`async_save_sharded`
    checkpoint_format = "dcp"     # "dcp" | "deepspeed"
    ema = None                    # the run's EMA of the weights (bigtrain.ema.attach_ema), in its checkpoints

    def __init__(self, model: GPT, cfg: Config, env: DistEnv):
        self.cfg, self.env = cfg, env
        self.raw_model = model  # the unwrapped GPT (its parameters may be sharded)
        self.model: nn.Module = model
        self.optimizer: torch.optim.Optimizer | None = None
        self._norm: torch.Tensor | None = None  # the measured step's global norm, for update()
        self.row_sink = None  # when set, loss_terms hands it each micro-batch's per-row CE sums (mixtures)

    # -- the step recipe ------------------------------------------------------------------
    def measure(self, batch, micro_size: int, after_backward=None, agree: torch.Tensor | None = None) -> StepStats:
        """All micro-batches of ``batch`` (this rank's rows) forward and backward, each loss
        scaled to its share of the rank's token mean; ``after_backward(self)`` runs after the
        last backward (and after any gradient reduction). Nothing is applied yet, and nothing
        is read back by the host: on CUDA the CPU runs on while the device computes.

        The loss, this rank's non-finite flag and ``agree`` (other per-rank numbers that every
        rank must agree on, e.g. stop requests; summed) go over the ranks in one all-reduce."""
        scale = 1.0 / batch.tokens[:, 1:].numel()
        micro = list(batch.micro_batches(micro_size))
        with phase("forward_backward"):
            for i, (inputs, targets) in enumerate(micro):
                share = self.forward_backward(inputs, targets, scale, last=i == len(micro) - 1)
                loss = share if i == 0 else loss + share
            if after_backward is not None:
                after_backward(self)
        with phase("reduce"):
            self._norm = self.grad_norm()
            # A NaN in this rank's loss makes the summed loss NaN everywhere; one in its gradients
            # may not (a fault written after the reduction), hence the flag: norm * 0 is 0 for a
            # finite norm and NaN otherwise, and stays NaN in the sum over ranks.
            parts = [loss.float().reshape(1), (self._norm.float() * 0).reshape(1)]
            if agree is not None:
                parts.append(agree.to(self.env.device, torch.float32, non_blocking=True).reshape(-1))
            packed = self.env.all_reduce(torch.cat(parts))
        # Ranks hold equal token counts, so the mean of the rank means is the global token mean.
        # (Under tensor parallelism the tp ranks of a group hold the same loss: the sum over the
        # world counts each dp group's loss tp times, and world = dp x tp.)
        mean_loss = packed[0] / self.env.world
        nonfinite = (packed[1] + mean_loss * 0).isnan()  # NaN when the loss or some rank's norm was not finite
        return StepStats(mean_loss, self._norm, nonfinite, packed[2:] if agree is not None else None)

    def update(self, lr: float | torch.Tensor, max_norm: float, apply: torch.Tensor | None = None) -> torch.Tensor:
        """Clip the measured gradients to ``max_norm`` (0: off), step the optimizer at ``lr`` and
        zero the gradients. ``apply`` (a 0-d bool tensor on the device, default True) decides on
        the device whether the step happens at all: where it is False, parameters, moments and
        step counts stay bitwise as they were, NaN gradients or not (fused AdamW's ``found_inf``
        skips the kernel; masking by multiplying with 0 would not do: 0 x NaN is NaN).
        Returns the clip factor as a 0-d tensor (1: not clipped)."""
        if self._norm is None:
            raise RuntimeError("Backend.update() needs the gradients of a measure() first")
        with phase("optimizer"):
            factor = self._clip_factor(self._norm, max_norm)
            self._step(lr, apply, factor if max_norm > 0 else None)
            self.discard()  # the gradients are spent
        return factor

    def discard(self) -> None:
        """Drop this step's gradients; parameters, moments and step counts stay as they were."""
        self._zero_grad()
        self._norm = None  # the next update needs a new measure

    def _zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    # -- forward / backward ---------------------------------------------------------
    def autocast(self):
        if self.cfg.parallel.precision == "bf16":
            return torch.autocast(device_type=self.env.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def loss_parallel(self):
        """The context the loss and its backward run in: the vocabulary-parallel cross-entropy
        under tensor parallelism with ``parallel.loss_parallel`` (bigtrain/parallel/fsdp.py)."""
        return contextlib.nullcontext()

    def loss_terms(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self.autocast():
            logits = self.model(inputs)
        z_loss, rows = self.cfg.model.z_loss, self.row_sink is not None
        if isinstance(logits, DTensor):  # vocabulary-parallel (parallel/tp.py): the same on every tp rank
            ce, _ = lm_loss(logits, targets, rows=rows)
            ce = ce.to_local()
            z_sum = z_loss * vocab_logsumexp(logits).pow(2).sum() if z_loss else torch.zeros((), device=ce.device)
        else:
            ce, z_sum = lm_loss(logits, targets, z_loss, rows=rows)
        if self.row_sink is not None:  # per-row sums of the one cross-entropy: per-source losses
            self.row_sink(ce.detach())
            ce = ce.sum()
        return ce, z_sum

    def forward_backward(self, inputs: torch.Tensor, targets: torch.Tensor, scale: float,
                         last: bool) -> torch.Tensor:
        """Run one micro-batch; ``scale`` turns its loss sum into its share of the
        rank's token-weighted mean. Returns the detached cross-entropy share."""
        with self.loss_parallel():
            ce_sum, z_sum = self.loss_terms(inputs, targets)
            self.backward((ce_sum + z_sum) * scale, last)
        return ce_sum.detach() * scale

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """Backward of one micro-batch's loss; ``last``: the step's final micro-batch, after
        which gradients are complete (reduced over ranks where the backend does that)."""
        loss.backward()

    @torch.no_grad()
    def eval_loss_sum(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with self.loss_parallel():
            ce_sum, _ = self.loss_terms(inputs, targets)
        return ce_sum.detach()

    # -- reductions --------------------------------------------------------------------
    def mean_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        t = value.detach().float().reshape(1).clone()
        return self.env.all_reduce(t) / self.env.world

    # -- gradients and updates -----------------------------------------------------------
    def trained_parameters(self) -> list[torch.Tensor]:
        """The parameters the optimizer updates, from its groups: walking the module tree
        (``model.parameters()``) twice a step cost about 0.2 ms on a 4-layer model."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def grads(self) -> list[torch.Tensor]:
        return [p.grad for p in self.trained_parameters() if p.grad is not None]

    def grad_norm(self) -> torch.Tensor:
        """The pre-clip L2 norm over every parameter, shard and rank (same on all ranks).
        A NaN or inf anywhere makes it non-finite everywhere."""
        grads = self.grads()
        if not grads:
            return torch.zeros((), device=self.env.device)
        norms = torch._foreach_norm(grads, 2.0)
        return torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))

    def _clip_factor(self, norm: torch.Tensor, max_norm: float) -> torch.Tensor:
        """What clipping to ``max_norm`` multiplies the gradients by, as ``clip_grad_norm_``
        computes it (1: not clipped, and always where ``max_norm`` is 0), on the device. A non-finite norm
        gives a non-finite factor: that step is never applied anyway."""
        if max_norm <= 0:
            return torch.ones((), device=norm.device)
        return (max_norm / (norm + 1e-6)).clamp(max=1.0)

    def _step(self, lr: float | torch.Tensor, apply: torch.Tensor | None, clip: torch.Tensor | None) -> None:
        """The optimizer's step at ``lr``, skipped on the device where ``apply`` is False, with
        the gradients clipped by the factor ``clip`` (None: not clipped) inside fused AdamW's
        kernel: its ``grad_scale`` divides each gradient as the kernel reads it, so dividing by
        1 / factor is the same update as multiplying every gradient first (to rounding; exact
        when not clipped), without that extra pass over every gradient (``clip_grad_norm_``'s
        multiply: 62 ms a step at 124M parameters on this CPU, 15 ms at 25M)."""
        groups = self.optimizer.param_groups
        saved = [g["lr"] for g in groups]
        set_lr(self.optimizer, lr)
        self.optimizer.found_inf = None if apply is None else (~apply).float()
        self.optimizer.grad_scale = None if clip is None else clip.reciprocal()
        try:
            self.optimizer.step()
        finally:  # the state dict keeps plain floats (a tensor there would change the checkpoint format)
            for group, value in zip(groups, saved):
                group["lr"] = value
            self.optimizer.found_inf = self.optimizer.grad_scale = None

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    def full_parameters(self) -> dict[str, torch.Tensor]:
        """Every parameter whole, fp32, on the CPU, by name; a collective (every rank calls it
        and gets the same tensors) when the backend shards them."""
        return {n: p.detach().float().cpu().clone() for n, p in self.raw_model.named_parameters()}

    # -- checkpoints (torch.distributed.checkpoint; DeepSpeed overrides these) -----------
    def ema_targets(self) -> dict[str, torch.Tensor]:
        """What an EMA of the weights averages on this rank, by parameter name: the parameters
        themselves (under FSDP2 DTensors, each rank's shards)."""
        return dict(self.raw_model.named_parameters())

    def ema_refresh(self) -> None:
        """After the EMA was swapped into (or out of) :meth:`ema_targets`: make the next forward
        compute with them. FSDP2 frees what it keeps gathered (the root, the last block), so
        the next forward gathers the shards as they are now."""
        from torch.distributed.fsdp import FSDPModule
        for module in self.raw_model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    def sharded_state(self) -> dict:
        """Model and optimizer as DCP sees them: keyed by parameter name (the optimizer's
        state too, not by position), each rank holding its own shards. So one checkpoint
        loads at any world size, and under either DCP backend (none, fsdp). With an EMA,
        its ``ema`` entry too (sharded like the parameters)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict
        model, optim = get_state_dict(self.model, self.optimizer)
        state = {"model": model, "optim": optim}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def save_sharded(self, path: Path) -> None:
        """Write this rank's shards into directory ``path``; every rank calls it."""
        dcp_io.save(self.sharded_state(), Path(path), self.env.distributed)

    def async_save_sharded(self, path: Path, group, stager) -> dcp_io.AsyncSaveResponse:
        """:meth:`save_sharded` in background threads: copy to CPU, then write (see dcp_io)."""
        return dcp_io.async_save(self.sharded_state(), Path(path), self.env.distributed, group, stager)

    def load_sharded(self, path: Path) -> None:
        """Restore model and optimizer from directory ``path``, resharded to this world. An EMA
        missing from the checkpoint (written with ``ema.decay: 0``) starts at the loaded weights."""
        from torch.distributed.checkpoint.state_dict import set_state_dict
        state = self.sharded_state()
        fresh_ema = "ema" in state and not dcp_io.holds(path, "ema")
        if fresh_ema:
            del state["ema"]
        dcp_io.load(state, Path(path), self.env.distributed)  # the EMA's tensors in place
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        if fresh_ema:
            self.ema.reset()
