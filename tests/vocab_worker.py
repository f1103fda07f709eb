"""One rank of tests/test_vocab_parallel.py: the lookup and the head on a sharded table
(bigtrain/parallel/vocab_parallel.py) against the same computation on the whole table.

    torchrun --nproc-per-node 3 tests/vocab_worker.py OUT

Every rank draws the same whole table, every rank's token ids and hidden states, and the
weights of a made-up loss (one generator), so it computes the reference itself: in float64
on the whole batch, the gradients of the sum of all ranks' losses. Its own computation uses
its rows of the table (a ``Shard(0)`` DTensor parameter, FSDP2's chunks) and its own tokens.
Writes ``OUT/rank<r>.json``: per case the largest relative error of the outputs and of the
gradients (the table's times the world size: the shard gradient is averaged, as FSDP's is).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from bigtrain.parallel.vocab_parallel import VocabParallel

CASES = [(10, 12, None), (4, 12, None), (37, 8, torch.bfloat16)]  # (vocab, d, compute dtype)


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.detach().double() - want).norm() / want.norm())


def case(vocab: int, d: int, dtype, rank: int, world: int, mesh) -> dict:
    g = torch.Generator().manual_seed(vocab)
    table = torch.randn(vocab, d, generator=g)
    idx = torch.randint(vocab, (world, 2, 5), generator=g)
    idx[:, 0, :3] = 1  # the same token several times on every rank: its gradients add up
    x = torch.randn(world, 2, 5, d, generator=g)
    w_rows, w_logits = torch.randn(world, 2, 5, d, generator=g), torch.randn(world, 2, 5, vocab, generator=g)

    ref_table, ref_x = table.double().requires_grad_(), x.double().requires_grad_()
    cast = (lambda t: t.to(dtype).double()) if dtype else (lambda t: t)  # what the dtype keeps of the values
    ref_rows, ref_logits = cast(ref_table)[idx], cast(ref_x) @ cast(ref_table).T
    ((ref_rows * w_rows).sum() + (ref_logits * w_logits).sum()).backward()

    param = torch.nn.Parameter(distribute_tensor(table, mesh, [Shard(0)]))
    mine = x[rank].clone().requires_grad_()
    vp = VocabParallel(dtype)
    rows, logits = vp.lookup(idx[rank], param), vp.head(mine, param)
    ((rows.double() * w_rows[rank]).sum() + (logits.double() * w_logits[rank]).sum()).backward()
    return {"vocab": vocab, "dtype": str(dtype), "local_rows": param.to_local().shape[0],
            "rows_dtype": str(rows.dtype), "logits_shape": list(logits.shape),
            "rows": rel(rows, ref_rows[rank].detach()), "logits": rel(logits, ref_logits[rank].detach()),
            "x_grad": rel(mine.grad, ref_x.grad[rank]),
            "table_grad": rel(param.grad.full_tensor() * world, ref_table.grad)}


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    results = [case(vocab, d, dtype, rank, world, mesh) for vocab, d, dtype in CASES]
    Path(sys.argv[1], f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
