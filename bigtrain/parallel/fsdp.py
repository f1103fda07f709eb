"""``parallel.backend: fsdp``: FSDP2 (``fully_shard``) on every block and at the root.

Why this layout: sharding each transformer block separately lets FSDP gather
one block's parameters at a time (peak memory = one block unsharded). The root
covers the rest: the token table and head (tied, so one group), positions and
final norm. Unless the table is used on its shards (``parallel.vocab_table``,
:mod:`bigtrain.parallel.vocab_parallel`): then the lookup and the head are
computed without gathering it, and each table is a group of its own, out of the
root (which would gather it) and never called, so never gathered. A tied head is
then registered as both modules, so its one parameter belongs to one module
(:meth:`bigtrain.model.gpt.GPT.share_tied_table`).

Mixed precision keeps fp32 master weights and optimizer state, computes in bf16,
and reduces gradients in fp32 so the sum over many ranks does not lose bits.

Resharding after forward frees each block's gathered weights until backward
needs them again; the last block is the first one backward needs, so it stays
gathered, and FSDP itself keeps the root gathered (it is needed at once).

Gradients are reduce-scattered after every micro-batch, as torchtitan does:
accumulating without sync would hold the whole model's unsharded gradients on
every rank, which is the memory FSDP exists to save. FSDP averages over ranks;
each rank's loss is already the token mean of its own equal share of the
global batch, so the average is the global token-weighted mean.

With ``parallel.tp > 1`` the world is a ``(dp, tp)`` mesh: the tensor-parallel plan
(:mod:`bigtrain.parallel.tp`) splits every layer over its tp group first, then FSDP
shards the resulting DTensors over the dp dim only (their placements become 2-D,
e.g. ``(_StridedShard(0), Shard(0))`` for a column-wise weight), as torchtitan
composes them. The gradient norm counts each value once over both dims.

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
from bigtrain.parallel.tp import parallelize, replicas
from bigtrain.parallel.vocab_parallel import VocabParallel, pays


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def vocab_sharded(cfg: Config, world: int, micro: int | None = None, tp: int | None = None) -> bool:
    """``parallel.vocab_table``: whether the token table is used on its shards (``auto``: where
    that holds less than gathering it, :func:`bigtrain.parallel.vocab_parallel.pays`), at the
    config's micro-batch and tp unless given (``bigtrain plan`` asks of other layouts)."""
    p, m = cfg.parallel, cfg.model
    micro, tp = micro or cfg.batch.micro_size, tp or p.tp
    if tp > 1 or p.vocab_table == "gather":
        return False
    return p.vocab_table == "sharded" or pays(world, micro * m.seq_len, m.vocab_size, m.d_model)


class FSDPBackend(Backend):
    name = "fsdp"

    def __init__(self, model: GPT, cfg: Config, env: DistEnv):
        deferred = is_meta(model)
        if not deferred:
            model = model.to(env.device)
        p = cfg.parallel
        dp_mesh = None  # tp 1: FSDP over the whole world, its default mesh
        if p.tp > 1:  # tensor parallel inside each tp group first, then FSDP over the dp dim (torchtitan's order)
            mesh = env.mesh()
            parallelize(model, mesh["tp"], p.loss_parallel)
            dp_mesh = mesh["dp"]
        prepare_blocks(model, cfg, env.device)
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if p.precision == "bf16" else MixedPrecisionPolicy()
        last = len(model.blocks) - 1
        for i, block in enumerate(model.blocks):
            fully_shard(block, mesh=dp_mesh, mp_policy=mp,
                        reshard_after_forward=p.reshard_after_forward and i < last)
        if vocab_sharded(cfg, env.world):  # the lookup and the head on the table's shards: never gathered
            model.share_tied_table()
            model.vocab_parallel = VocabParallel(mp.param_dtype)
            for table in dict.fromkeys([model.tok_emb, model.lm_head]):  # a tied model's one table once
                fully_shard(table, mp_policy=mp)  # a group of its own, so the root does not gather it
        fully_shard(model, mesh=dp_mesh, mp_policy=mp)  # the root: FSDP keeps it gathered from forward to backward
        if deferred:  # storage for this rank's shards only, then their values
            materialize(model, initial_weights(cfg, model), env.device)
        super().__init__(model, cfg, env)
        self.optimizer = build_optimizer(model, cfg)

    def grads(self) -> list[torch.Tensor]:
        return [_local(p.grad) for p in self.trained_parameters() if p.grad is not None]

    def grad_norm(self) -> torch.Tensor:
        """Sum of squares over this rank's shards, all-reduced: the exact global norm. Under tensor
        parallelism some local parts are repeated on several ranks (a norm weight on every rank
        of its tp group): each square sum is divided by its number of copies, so every value
        counts once over both mesh dims."""
        by_copies: dict[int, list[torch.Tensor]] = {}
        for p in self.trained_parameters():
            if p.grad is not None:
                by_copies.setdefault(replicas(p.grad, self.env.world), []).append(_local(p.grad))
        sq = torch.zeros((), device=self.env.device)
        for copies, grads in by_copies.items():
            part = torch.stack([n.float() for n in torch._foreach_norm(grads, 2.0)]).pow(2).sum()
            sq = sq + (part if copies == 1 else part / copies)
        return self.env.all_reduce(sq.reshape(1)).sqrt().reshape(())

    def loss_parallel(self):
        """The vocabulary-parallel cross-entropy (``parallel.loss_parallel``) around the loss and its
        backward: the logits stay sharded over the vocabulary (bigtrain/parallel/tp.py)."""
        if self.cfg.parallel.loss_parallel:
            from torch.distributed.tensor.parallel import loss_parallel
            return loss_parallel()
        return super().loss_parallel()

    def full_parameters(self) -> dict[str, torch.Tensor]:
        return {n: p.full_tensor().detach().float().cpu() for n, p in self.raw_model.named_parameters()}
