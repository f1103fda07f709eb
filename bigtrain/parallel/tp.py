"""Tensor parallelism (``parallel.tp: N``): the plan that splits each layer over a tp group.

The world is a 2-D mesh ``(dp, tp)``, ranks in row-major order, so a tp group is ``tp``
consecutive ranks (one node's GPUs, where the per-layer collectives are cheap) and FSDP
shards over the ``dp = world / tp`` groups (:mod:`bigtrain.parallel.fsdp`). Every rank
of a tp group reads the same rows of the global batch (the loader uses the dp rank and
size) and computes one loss; the plan below splits the work inside each layer.

The plan (Megatron-LM's split, with sequence parallelism; the torchtitan recipe):

* ``attn.q``, ``attn.k``, ``attn.v``: ``ColwiseParallel``. Their output rows are heads,
  so each rank computes ``n_head / tp`` query and ``n_kv_head / tp`` key/value heads and
  attention runs on its own heads with no communication (hence tp must divide both head
  counts; the attention module reads its head counts from the projections' local outputs).
  QK-norm weights are shared by all heads: replicated, each rank normalising its own heads
  (``SequenceParallel`` over the heads dim), their gradients summed over the group. ``attn.proj``:
  ``RowwiseParallel``, its input is the local heads' output; its partial sums are
  reduce-scattered over the sequence (``Shard(1)``).
* MLP: ``fc`` (or ``gate`` and ``up``) column-wise, ``proj`` row-wise: the hidden
  activation never leaves its rank; one reduce-scatter per MLP.
* Between the blocks the residual stream is sharded over the *sequence*
  (``SequenceParallel``): norms and dropout are per-token, so each rank does its own
  ``T / tp`` tokens instead of repeating the whole sequence, and activations there cost
  ``1 / tp`` of the memory. ``PrepareModuleInput`` all-gathers the sequence before
  attention and the MLP (they need every token); the row-wise layers reduce-scatter
  after. Per block: 2 all-gathers and 2 reduce-scatters, the same bytes as the 2
  all-reduces of TP without sequence parallelism.
* ``tok_emb``: ``RowwiseParallel`` on the embedding shards the *vocabulary* (rows of the
  table, ``Shard(0)``): each rank looks up the ids it holds and the partial results are
  reduce-scattered into the sequence-sharded stream. ``lm_head``: ``ColwiseParallel``,
  also ``Shard(0)`` on the vocabulary (the rows of its weight). Both give the weight the
  same placement, so GPT-2's tied head can stay one parameter (re-tied after the plan).
  The vocabulary may split unevenly (GPT-2's 50257; the tests train 257 at tp=2).
  The logits are either all-gathered over the vocabulary (the loss code is unchanged),
  or, with ``parallel.loss_parallel``, left sharded and fed to a vocabulary-parallel
  cross-entropy (``loss_parallel()``; the z-loss's logsumexp: :func:`vocab_logsumexp`):
  the ``[tokens, vocab]`` logits, the biggest activation of a small model, are never
  gathered.
* ``pos_emb`` (learned positions): the table is replicated and each rank looks up the
  positions of its own sequence chunk (:class:`PositionChunk`), to add to its chunk of
  the stream. With ``model.doc_mask`` the positions are per row (``[B, T]``, restarting
  at each document) and are chunked the same way; documents are found from the token ids,
  which every rank holds whole, and the attention mask is per row, so it applies to each
  rank's heads unchanged.

Parameters replicated over the tp group (norm weights, the position table, biases of the
row-wise layers) are DTensors with a ``Replicate`` placement on the tp mesh: their
gradients, partial per rank (each saw its own tokens), are summed over the group by
DTensor, and :func:`replicas` says how many ranks hold each, so the global gradient norm
counts every parameter once.

Dropout: every dropout is in a region that is split (sequence chunks or heads), never in a
replicated one, so ranks keep their own dropout seeds (independent masks, as the rows of
different dp ranks have). A dropout inside a replicated region would need the same seed
on the whole tp group.

Refused by :func:`check_tp` before any process group starts: tp > 1 with another backend
than fsdp (DeepSpeed stays data parallel), a tp that does not divide the head counts, the
MLP width, the sequence (sequence parallelism), the world or (loss parallel) the
vocabulary; and ``parallel.vocab_table: sharded`` outside FSDP at tp 1.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (ColwiseParallel, ParallelStyle, PrepareModuleInput, RowwiseParallel,
                                               SequenceParallel, parallelize_module)

from bigtrain.errors import ConfigError


def check_tp(cfg, world: int) -> None:
    """Refuse, with one line, a layout the tp plan cannot split (before any process group starts)."""
    p, m = cfg.parallel, cfg.model
    tp = p.tp
    if p.vocab_table == "sharded" and (p.backend != "fsdp" or tp > 1):
        raise ConfigError(f"config error: parallel.vocab_table=sharded needs parallel.backend=fsdp and parallel.tp=1 "
                          f"(got backend {p.backend}, tp {tp})")
    if p.loss_parallel and tp == 1:
        raise ConfigError("config error: parallel.loss_parallel needs parallel.tp > 1")
    if tp == 1:
        return
    if p.backend != "fsdp":
        raise ConfigError(f"config error: parallel.tp={tp} needs parallel.backend=fsdp (tensor parallelism is "
                          f"combined with FSDP2; backend {p.backend} stays data parallel)")
    need = {"model.n_head": m.n_head, "model.n_kv_head": m.kv_heads,
            "the MLP width (model.d_ff)": m.ffn_dim, "model.seq_len": m.seq_len, "world size": world}
    if p.loss_parallel:
        need["model.vocab_size"] = m.vocab_size
    for what, n in need.items():
        if isinstance(n, int) and n % tp:
            raise ConfigError(f"config error: parallel.tp={tp} does not divide {what}={n}")


class PositionChunk(ParallelStyle):
    """The learned position table, replicated over the tp group; each rank looks up the
    positions of its own sequence chunk (the last dim of the positions), so the result adds
    to its chunk of the sequence-sharded stream. The table's gradient, partial per rank, is
    summed over the group by DTensor."""

    def _apply(self, module: nn.Module, mesh) -> nn.Module:
        def replicate(name, mod, mesh):
            for pname, param in list(mod.named_parameters(recurse=False)):
                mod.register_parameter(pname, nn.Parameter(DTensor.from_local(param, mesh, [Replicate()],
                                                                               run_check=False)))

        def chunk(mod, inputs, mesh):
            positions = inputs[0]
            whole = DTensor.from_local(positions, mesh, [Replicate()], run_check=False)
            return whole.redistribute(mesh, [Shard(positions.dim() - 1)])  # a local slice, no traffic

        return distribute_module(module, mesh, replicate, chunk, lambda mod, out, mesh: out.to_local())


def block_plan(block: nn.Module) -> dict[str, ParallelStyle]:
    """The plan of one transformer block (names relative to the block)."""
    plan: dict[str, ParallelStyle] = {
        "norm1": SequenceParallel(),
        "attn": PrepareModuleInput(input_layouts=(Shard(1), None, None),
                                   desired_input_layouts=(Replicate(), None, None)),
        "attn.q": ColwiseParallel(), "attn.k": ColwiseParallel(), "attn.v": ColwiseParallel(),
        "attn.proj": RowwiseParallel(output_layouts=Shard(1)),
        "norm2": SequenceParallel(),
        "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        "mlp.proj": RowwiseParallel(output_layouts=Shard(1)),
    }
    for name in ("fc", "gate", "up"):
        if hasattr(block.mlp, name):
            plan[f"mlp.{name}"] = ColwiseParallel()
    if block.attn.q_norm is not None:  # per head, on this rank's heads [B, T, heads, hd]: heads are dim 2
        plan["attn.q_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
        plan["attn.k_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
    return plan


def parallelize(model: nn.Module, mesh, loss_parallel: bool) -> None:
    """Apply the plan to ``model`` (a :class:`bigtrain.model.gpt.GPT`, on ``meta`` or built) over
    the 1-D tp ``mesh``, in place: parameter names are unchanged, so checkpoints and exports
    are too."""
    top: dict[str, ParallelStyle] = {
        "tok_emb": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm_f": SequenceParallel(),
        "lm_head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1) if loss_parallel else Replicate(),
                                   use_local_output=not loss_parallel),
    }
    if model.pos_emb is not None:
        top["pos_emb"] = PositionChunk()
    tied = model.lm_head.weight is model.tok_emb.weight
    parallelize_module(model, mesh, top)
    if tied:  # both are Shard(0) on the vocabulary: one parameter again
        model.lm_head.weight = model.tok_emb.weight
    for block in model.blocks:
        parallelize_module(block, mesh, block_plan(block))


def vocab_logsumexp(logits: DTensor) -> torch.Tensor:
    """``logsumexp`` over the last dim of vocabulary-sharded logits (``parallel.loss_parallel``),
    as a plain tensor, the same on every rank of the tp group, differentiable: each rank's
    logsumexp over its own columns, gathered (``[..., tp]``), then combined. Only ``tp``
    numbers per token travel, never the logits (the z-loss needs it)."""
    mine = logits.to_local().float().logsumexp(-1, keepdim=True)
    parts = DTensor.from_local(mine, logits.device_mesh, [Shard(mine.dim() - 1)], run_check=False)
    return parts.full_tensor().logsumexp(-1)


def replicas(t: torch.Tensor, world: int) -> int:
    """On how many of the ``world`` ranks the values of ``t``'s local part are repeated: the mesh
    dims where it is replicated, and the ranks outside its mesh (a parameter FSDP shards over
    the dp mesh only is repeated on every tp rank). A plain tensor is everywhere."""
    if not isinstance(t, DTensor):
        return world
    mesh = t.device_mesh
    kept = [mesh.size(i) for i, p in enumerate(t.placements) if p.is_replicate()]
    return world // mesh.size() * math.prod(kept)
