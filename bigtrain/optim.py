"""Parameter groups, AdamW, the LR schedule and the batch-size scaling rules.

``optim.lr`` is the peak LR *at* ``batch.reference_size``. The LR actually used
at a step is

    lr(step, B) = scale(B / reference) * base(step)

where ``base`` is linear warmup from 0 to ``optim.lr`` over ``warmup_steps``,
then cosine/linear/constant decay to ``schedule.min_lr`` at ``max_steps``, or
warmup-stable-decay (``wsd``): the peak until ``stable_until()`` (``decay_start``,
default ``max_steps`` minus the decay length), then over ``decay_length()`` updates

    base = min_lr + (peak - min_lr) * shape(progress),  progress = (step - start) / length

with shape ``1 - p`` (linear), ``(1 + cos(pi p)) / 2`` (cosine) or ``1 - sqrt(p)``
(1-sqrt, Hägele et al. 2024), and ``min_lr`` after it. Because the stable phase is
constant, a checkpoint from it can be annealed with any decay (``bigtrain anneal``). And
``scale`` is ``k`` (linear rule, Goyal et al.), ``sqrt(k)`` (Adam's rule,
Malladi et al.) or 1. Both the peak and the floor are scaled, so a ramped-up
batch follows the same curve shape at its own size. Everything is a pure
function of (step, batch size, config): resume needs no scheduler state.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from bigtrain.config import Config


def param_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool = False) -> list[dict]:
    """Decay matrices only: biases and norm gains are scale parameters, embeddings
    are lookups whose rows see few gradients (decay would shrink rare tokens)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_embedding = "emb" in name.split(".")[-2] if "." in name else False
        if p.ndim < 2 or (is_embedding and not decay_embeddings):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """torch's fused AdamW, on CPU and CUDA alike. Why fused: one kernel per parameter group
    instead of a dozen foreach passes (in the training loop on this CPU, bigtrain's norm, clip
    and step take 3.9 ms a step on the 0.8M char model and 48 ms at 25M, against 8.7-8.9 and
    137-140 ms with foreach or torch's default AdamW: ``bench/optimizer.py``), and it is the
    AdamW that can skip a step on the device:
    with ``optimizer.found_inf`` set to 1 it changes nothing, parameters, moments and step
    count included, whatever NaN the gradients hold (:meth:`Backend.update`)."""
    o = cfg.optim
    groups = param_groups(model, o.weight_decay, o.decay_embeddings)
    optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=True)
    init_state(optimizer)
    optimizer.register_load_state_dict_post_hook(stay_fused)
    return optimizer


def stay_fused(optimizer: torch.optim.AdamW) -> None:
    """After ``load_state_dict``: the groups hold the saved flags, and a checkpoint written when
    the optimizer was foreach (before fused AdamW) would turn it back into foreach, with its step
    counts on the CPU. Fused it stays (the device-side skip needs it), step counts on the device."""
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = True, None
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state and "step" in state:
                state["step"] = state["step"].to(p.device, torch.float32)


def init_state(optimizer: torch.optim.AdamW) -> None:
    """Create AdamW's state now, exactly as its first ``step()`` would (step 0, zero moments,
    the step count an fp32 scalar on the parameter's device, as torch keeps it for fused).

    Why: a checkpoint taken before the first applied update (say every update so far was
    skipped) asks DCP's ``get_state_dict`` for the optimizer state; when there is none, DCP
    creates it by running ``step()`` on zero gradients, which counts a step and shifts Adam's
    bias correction, so a run that saves would train differently from one that does not.
    With the state already there, saving has nothing to create, and the first real ``step()``
    finds the state it would have made itself (tests/test_step.py compares the two bitwise)."""
    for group in optimizer.param_groups:
        if group["amsgrad"] or not group["fused"]:
            raise ValueError("init_state mirrors fused AdamW without amsgrad")
        for p in group["params"]:
            optimizer.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=p.device),
                                  "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                  "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}


def batch_scale(batch_size: int, cfg: Config) -> float:
    k = batch_size / cfg.reference_batch()
    return {"linear": k, "sqrt": math.sqrt(k), "none": 1.0}[cfg.schedule.scaling]


def base_lr(step: int, cfg: Config) -> float:
    """LR at ``step`` (0-based: the updates applied so far) before batch scaling."""
    s, peak = cfg.schedule, cfg.optim.lr
    if step < s.warmup_steps:
        return peak * (step + 1) / s.warmup_steps
    if s.decay == "constant":
        return peak
    if s.decay == "wsd":
        start, span, kind = s.stable_until(), s.decay_length(), s.decay_shape
    else:
        start, span, kind = s.warmup_steps, max(1, s.max_steps - s.warmup_steps), s.decay
    if step < start:
        return peak
    return s.min_lr + (peak - s.min_lr) * decay_shape(kind, min(1.0, (step - start) / span))


def decay_shape(kind: str, progress: float) -> float:
    """The fraction of (peak - min_lr) left at ``progress`` in [0, 1] of the decay."""
    if kind == "linear":
        return 1.0 - progress
    if kind == "1-sqrt":
        return 1.0 - math.sqrt(progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_at(step: int, batch_size: int, cfg: Config) -> float:
    return batch_scale(batch_size, cfg) * base_lr(step, cfg)


def set_lr(optimizer: torch.optim.Optimizer, lr: float | torch.Tensor) -> None:
    """``lr`` may be a 0-d tensor on the device (fused AdamW reads it there, without a sync)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
