"""Activation checkpointing: what a block keeps for backward, and what it recomputes.

Memory during training is mostly activations, and most of them are cheap to recompute.
``parallel.activation_checkpointing`` chooses, per block:

* ``none``: keep everything (fastest, most memory).
* ``full``: keep only the block's input and re-run the whole block in backward
  (about a third more compute; the least memory).
* ``op``: re-run the block in backward but keep the outputs of its expensive ops
  (matmuls and attention), so only the cheap ones are recomputed: norms, GELU/SwiGLU,
  RoPE, residual adds. Most of the memory saving of ``full`` at a fraction of its cost
  (torchtitan's "selective op" policy), built on torch's selective checkpoint contexts.

``parallel.checkpoint_every: k`` applies the choice to every k-th block only (blocks
0, k, 2k, ...): memory and speed in between (torchtitan's "selective layer" policy).

Checkpointing wraps ``block.forward`` in place, so parameter names (and therefore
checkpoints and exports) are the same with and without it. Dropout masks are redrawn
identically in the recompute (torch restores the RNG state), so gradients are those of
the run without checkpointing.
"""
from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

aten = torch.ops.aten

# The ops whose outputs ``op`` keeps: the matmuls and the fused attention kernels of
# every device (CPU, flash, memory-efficient, cuDNN). Everything else is recomputed.
EXPENSIVE_OPS = {
    aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default,
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_cudnn_attention.default,
}


def _keep_expensive(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in EXPENSIVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _op_policy_contexts():
    return create_selective_checkpoint_contexts(_keep_expensive)


def checkpoint_blocks(blocks: nn.ModuleList, mode: str, every: int) -> None:
    """Wrap every ``every``-th block's forward for activation checkpointing ``mode``."""
    if mode == "none":
        return
    extra = {"context_fn": _op_policy_contexts} if mode == "op" else {}
    for i, block in enumerate(blocks):
        if i % every == 0:
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False, **extra)
