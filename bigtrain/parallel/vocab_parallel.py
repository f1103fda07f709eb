"""The token table used where FSDP keeps it: the lookup and the head computed on its shards.

Why: FSDP gathers a parameter whole around its module's call. For the ``[vocab, d]`` token
table that means the whole table on every rank for a lookup that reads a few rows, and in the
backward the head's whole ``[vocab, d]`` gradient, FSDP's copy of it to reduce-scatter and
gloo's staging of that: three tables at once. With a tied head it is worse: one parameter of
two modules must sit in FSDP's root group, gathered from the first lookup to the end of the
backward. gpt2-350m on 4 ranks spent about 0.5 GiB of a rank's 2.4 GiB peak there.

``parallel.vocab_table: sharded`` computes both uses on the shards, over the data-parallel
ranks as tensor parallelism's vocabulary-parallel layers do over theirs: each rank owns the
rows FSDP gave it (``Shard(0)``, FSDP2's chunks of ``ceil(vocab / world)``) and does their
part of the work for the tokens of every rank.

- lookup: the token ids are all-gathered; each rank fills its own rows for all of them (zeros
  elsewhere) and a reduce-scatter hands each rank its tokens' rows (one owner per row: exact).
  Backward: the output gradients are all-gathered, each rank adds its tokens' into its shard's.
- head: the hidden states are all-gathered; each rank multiplies them by its rows, giving its
  columns of every token's logits, and an all-to-all hands each rank its tokens' whole rows of
  logits. Backward: the logits' gradient goes back by the same all-to-all; each rank's shard
  gradient is its columns' gradient times the gathered hidden states (no other rank needed),
  and the hidden states' gradient is summed over the ranks' columns by a reduce-scatter.

Shard gradients are divided by the world size, as FSDP's reduce-scatter averages, so they are
what FSDP would have given. What travels and is held scales with a micro-batch's tokens
(``world x tokens x d`` hidden states, two more copies of the logits) instead of the table
(``vocab x d``, three times): :func:`pays` chooses for ``auto``. It assumes every rank's
micro-batch has the same shape, as the trainer's batches (global = micro x dp x k) and
evaluation's are.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor


# the backward nodes that mix ranks' values (a NaN in one rank's tokens reaches every shard)
EXCHANGE_OPS = ("_LookupBackward", "_HeadBackward")


def pays(world: int, tokens: int, vocab: int, d_model: int) -> bool:
    """Whether the exchange (two copies of ``tokens x vocab`` logits, ``world x tokens x d``
    hidden states) holds less than gathering the table does (table, gradient, reduce copy)."""
    return world > 1 and 2 * tokens * vocab + 2 * world * tokens * d_model < 3 * vocab * d_model


def _gather(x: torch.Tensor, group, world: int) -> torch.Tensor:
    out = x.new_empty(world * x.shape[0], *x.shape[1:])
    dist.all_gather_into_tensor(out, x.contiguous(), group=group)
    return out


def _exchange(blocks: torch.Tensor, group) -> torch.Tensor:
    """``[world, ...]`` -> ``[world, ...]``: block q goes to rank q, block r of the result came from rank r."""
    blocks = blocks.contiguous()
    out = torch.empty_like(blocks)  # (of a transposed tensor, empty_like would keep its strides)
    dist.all_to_all_single(out, blocks, group=group)
    return out


class _Lookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, idx, shard, start, group, dtype):
        world = dist.get_world_size(group)
        at = _gather(idx.reshape(-1), group, world) - start
        mine = ((at >= 0) & (at < shard.shape[0])).unsqueeze(1)
        at = at.clamp(0, max(shard.shape[0] - 1, 0))
        source = shard if shard.shape[0] else shard.new_zeros(1, shard.shape[1])  # a rank past the vocabulary
        rows = torch.where(mine, source[at].to(dtype), 0)  # NaN-safe: the other ranks' rows are zeros here
        out = rows.new_empty(idx.numel(), shard.shape[1])
        dist.reduce_scatter_tensor(out, rows, group=group)
        ctx.save_for_backward(at, mine)
        ctx.shard_shape, ctx.group, ctx.world = shard.shape, group, world
        return out.view(*idx.shape, shard.shape[1])

    @staticmethod
    def backward(ctx, grad):
        at, mine = ctx.saved_tensors
        every = _gather(grad.reshape(-1, grad.shape[-1]), ctx.group, ctx.world)
        shard_grad = torch.zeros(ctx.shard_shape, device=grad.device)
        if ctx.shard_shape[0]:
            shard_grad.index_add_(0, at, torch.where(mine, every.float(), 0))
        return None, shard_grad.div_(ctx.world), None, None, None


class _Head(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shard, chunk, vocab, group, dtype):
        world, tokens = dist.get_world_size(group), x.shape[:-1]
        every = _gather(x.reshape(-1, x.shape[-1]).to(dtype), group, world)       # [world * n, d]
        padded = F.pad(shard.to(dtype), (0, 0, 0, chunk - shard.shape[0]))        # [chunk, d]
        columns = _exchange((every @ padded.T).view(world, -1, chunk), group)      # [world (owner), n, chunk]
        logits = columns.permute(1, 0, 2).reshape(-1, world * chunk)[:, :vocab]   # [n, vocab]
        ctx.save_for_backward(every, shard)
        ctx.chunk, ctx.group, ctx.world, ctx.dtype, ctx.x = chunk, group, world, dtype, (x.shape, x.dtype)
        return logits.view(*tokens, vocab)

    @staticmethod
    def backward(ctx, grad):
        every, shard = ctx.saved_tensors
        world, chunk, rows = ctx.world, ctx.chunk, shard.shape[0]
        grad = F.pad(grad.reshape(-1, grad.shape[-1]).to(ctx.dtype), (0, world * chunk - grad.shape[-1]))
        mine = _exchange(grad.view(-1, world, chunk).transpose(0, 1), ctx.group)  # [world (token's rank), n, chunk]
        mine = mine.reshape(-1, chunk)[:, :rows]                                 # [world * n, rows]
        shard_grad = (mine.T @ every).float().div_(ctx.world)
        partial = (mine @ shard.to(ctx.dtype)).float()                           # [world * n, d], summed over ranks
        x_grad = partial.new_empty(partial.shape[0] // world, partial.shape[1])
        dist.reduce_scatter_tensor(x_grad, partial, group=ctx.group)
        return x_grad.view(ctx.x[0]).to(ctx.x[1]), shard_grad, None, None, None, None


class VocabParallel:
    """The lookup and the head on a token table that is an FSDP-sharded ``Shard(0)`` DTensor
    parameter (read outside its module's call, so FSDP never gathers it), in ``dtype`` (the
    compute dtype FSDP's mixed precision would cast the gathered table to; None: the table's)."""

    def __init__(self, dtype: torch.dtype | None):
        self.dtype = dtype

    def _parts(self, table: DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
        _, offset = compute_local_shape_and_global_offset(table.shape, table.device_mesh, table.placements)
        shard = table.to_local()
        return shard, offset[0], table.device_mesh.get_group(), self.dtype or shard.dtype

    def lookup(self, idx: torch.Tensor, table: DTensor) -> torch.Tensor:
        """``table[idx]``: [*idx.shape, d]."""
        shard, start, group, dtype = self._parts(table)
        return _Lookup.apply(idx, shard, start, group, dtype)

    def head(self, x: torch.Tensor, table: DTensor) -> torch.Tensor:
        """``x @ table.T``: [*x.shape[:-1], vocab]."""
        shard, _, group, dtype = self._parts(table)
        chunk = -(-table.shape[0] // dist.get_world_size(group))
        return _Head.apply(x, shard, chunk, table.shape[0], group, dtype)
