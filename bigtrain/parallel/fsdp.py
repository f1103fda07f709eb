"""``parallel.backend: fsdp``: FSDP2 (``fully_shard``) on every block and at the root.

Why this layout: sharding each transformer block separately lets FSDP gather
one block's parameters at a time (peak memory = one block unsharded), and
the root call covers the embeddings, final norm and head (tied, so they must
share one group). Mixed precision keeps fp32 master weights and optimizer
state, computes in bf16, and reduces gradients in fp32 so the sum over many
ranks does not lose bits.

Resharding after forward frees each block's gathered weights until backward
needs them again; the last block is the first one backward needs, so it stays
gathered, and FSDP itself keeps the root gathered (it is needed at once).

Gradients are reduce-scattered after every micro-batch, as torchtitan does:
accumulating without sync would hold the whole model's unsharded gradients on
every rank, which is the memory FSDP exists to save. FSDP averages over ranks;
each rank's loss is already the token mean of its own equal share of the
global batch, so the average is the global token-weighted mean.

Initialisation: the trainer builds the model on ``meta``; it is sharded there (no
memory) and only then materialised, each rank writing its own shards of each
parameter (:mod:`bigtrain.model.init`), so a rank never holds the whole model and the
sharded run starts from bitwise the single-process weights. A model built whole
(tests, tools) is moved to the device and sharded as it is.
"""
from __future__ import annotations

import torch
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from bigtrain.config import Config
from bigtrain.model.gpt import GPT
from bigtrain.model.init import initial_weights, is_meta, materialize
from bigtrain.optim import build_optimizer
from bigtrain.parallel.base import Backend, prepare_blocks
from bigtrain.parallel.env import DistEnv


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class FSDPBackend(Backend):
    name = "fsdp"

    def __init__(self, model: GPT, cfg: Config, env: DistEnv):
        deferred = is_meta(model)
        if not deferred:
            model = model.to(env.device)
        prepare_blocks(model, cfg)
        p = cfg.parallel
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if p.precision == "bf16" else MixedPrecisionPolicy()
        last = len(model.blocks) - 1
        for i, block in enumerate(model.blocks):
            fully_shard(block, mp_policy=mp, reshard_after_forward=p.reshard_after_forward and i < last)
        fully_shard(model, mp_policy=mp)  # the root: FSDP keeps it gathered from forward to backward
        if deferred:  # storage for this rank's shards only, then their values
            materialize(model, initial_weights(cfg, model), env.device)
        super().__init__(model, cfg, env)
        self.optimizer = build_optimizer(model, cfg)

    def grads(self) -> list[torch.Tensor]:
        return [_local(p.grad) for p in self.model.parameters() if p.grad is not None]

    def grad_norm(self) -> torch.Tensor:
        """Sum of squares over this rank's shards, all-reduced: the exact global norm."""
        grads = self.grads()
        sq = torch.zeros((), device=self.env.device)
        if grads:
            sq = torch.stack([n.float() for n in torch._foreach_norm(grads, 2.0)]).pow(2).sum()
        return self.env.all_reduce(sq.reshape(1)).sqrt().reshape(())

    def full_parameters(self) -> dict[str, torch.Tensor]:
        return {n: p.full_tensor().detach().float().cpu() for n, p in self.raw_model.named_parameters()}
