"""Sharded initialisation: every rank fills only its own part of each parameter.

A run builds its model on the ``meta`` device (shapes, no storage), the backend lays
it out (FSDP2 shards it, DeepSpeed ZeRO-3 partitions it, the others keep it whole)
and only then are the weights written, by :func:`materialize`, one parameter at a
time: the *source* (``tensor_for(name, param, rows)``) gives the rows of the parameter
this rank holds (dim 0, where FSDP2 shards), as a fp32 CPU tensor, and the rank copies
in its part of them. A rank's peak host memory while building is therefore its own
shards plus about one shard of the parameter being written (a layout that splits
columns, as tensor parallel's row-wise split does, draws its rows whole; ZeRO-3: plus
the largest parameter gathered), not the whole model or its largest parameter
(``bench/init.py`` measures it).

The default source is :func:`seeded`: parameter ``name`` is drawn by the model's own
rule (:meth:`GPT.initial_value`) from a CPU ``torch.Generator`` seeded by
``blake2b(seed, name)``. Its values depend on nothing but the seed and the name, not
on the order parameters are built in, the device, the world size or the layout, so a
one-process run and any sharded run start from bitwise the same weights (the data
order already gives them the same batches). A rank does not draw the whole parameter:
:func:`normal_rows` computes only its rows, bitwise equal to the same rows of the
whole draw, by stepping the generator past the rows before them (cheaper than drawing
them; so the last rank's share of CPU time is still most of the model's).

Another source plugs in the same way: ``init_from`` (continued pretraining from a
Hugging Face checkpoint) returns each parameter's rows by name, and the rest (only
this rank's part is kept) is unchanged. :func:`initial_weights` is the one place that
chooses the source of a run.
"""
from __future__ import annotations

import hashlib
import math
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from bigtrain.errors import ConfigError

if TYPE_CHECKING:
    from bigtrain.config import Config

# ``model`` below is a bigtrain.model.gpt.GPT (not imported: gpt.py imports this module); besides
# its parameters this module uses its initial_value(name, shape, generator, rows), tie_weights() and
# init_buffers().

# tensor_for(name, param, rows) -> rows ``rows`` (a slice of dim 0, step 1) of the parameter's
# full value: fp32, on the CPU, of shape ``(len(rows), *param.shape[1:])`` (``param.shape`` is the
# global shape, also for a DTensor shard; ``name`` as in ``model.named_parameters()``; a tied
# weight is asked for once, under its first name). Called once per parameter on every rank
# (ZeRO-3: on rank 0 only, for all rows), in any order.
TensorFor = Callable[[str, torch.Tensor, slice], torch.Tensor]


def param_seed(seed: int, name: str) -> int:
    """The generator seed of parameter ``name``: a hash, so neighbouring names or seeds
    give unrelated streams and no parameter's values depend on another's."""
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # torch seeds are at most 2**63 - 1 here


def seeded(model: nn.Module, seed: int) -> TensorFor:
    """The project's init as a source: ``model.initial_value(name, shape, generator, rows)`` with
    a fresh CPU generator seeded by :func:`param_seed` for each parameter (on CUDA too: the
    values are drawn on the CPU and copied, so they never depend on the device)."""
    def tensor_for(name: str, param: torch.Tensor, rows: slice) -> torch.Tensor:
        generator = torch.Generator(device="cpu").manual_seed(param_seed(seed, name))
        return model.initial_value(name, param.shape, generator, rows)
    return tensor_for


def normal_rows(shape: torch.Size, std: float, generator: torch.Generator, rows: slice) -> torch.Tensor:
    """``torch.empty(shape).normal_(0, std, generator=generator)[rows]``, bitwise, computing only
    those rows: a rank's FSDP shard of a parameter without the whole parameter in memory.

    It relies on how torch's CPU ``normal_`` fills a contiguous fp32 tensor of n >= 16
    elements: one uniform per element from the generator's stream, then Box-Muller over each
    block of 16 (elements i and i + 8 from uniforms i and i + 8); when n is not a multiple of
    16, 16 more uniforms (stream positions n .. n + 15) redraw the last 16 elements. So
    element i of a block depends only on its block's 16 stream positions: the rows' blocks are
    drawn by a ``normal_`` of just those blocks after stepping the generator past the blocks
    before them (``random_`` into bytes takes one uniform each, without Box-Muller), and the
    last 16 elements from the 16 draws after the whole stream. tests/test_init.py checks
    this against the whole draw (any shape, any rows), so a torch that draws otherwise fails
    there, not silently.
    """
    first, stop, step = rows.indices(shape[0])
    if step != 1:
        raise ValueError(f"normal_rows: rows must be a range of step 1, not {rows}")
    width = math.prod(shape[1:])
    n, start, end = shape[0] * width, first * width, max(first, stop) * width
    if n < 16:  # torch draws these one by one (another stream): draw the whole, it is tiny
        return torch.empty(shape).normal_(0.0, std, generator=generator)[rows]
    if start == end:
        return torch.empty((0, *shape[1:]))
    body = n // 16 * 16  # the elements drawn in blocks of 16
    lo = min(start, body) // 16 * 16  # the first element of the first block needed
    hi = max(lo, min(-(-end // 16) * 16, body))  # the end of the last block needed
    out = torch.empty(max(hi, end) - lo)
    _skip(generator, lo)
    if hi > lo:
        out[:hi - lo].normal_(0.0, std, generator=generator)
    if n % 16 and end > n - 16:  # the last 16 elements, redrawn after the whole stream
        _skip(generator, n - hi)
        last = torch.empty(16).normal_(0.0, std, generator=generator)
        keep = max(start, n - 16)
        out[keep - lo:end - lo] = last[keep - (n - 16):end - (n - 16)]
    return out[start - lo:end - lo].view(stop - first, *shape[1:])


def _skip(generator: torch.Generator, count: int, chunk: int = 1 << 20) -> None:
    """Advance ``generator`` by ``count`` 32-bit draws (one per byte of ``random_``)."""
    scratch = torch.empty(min(count, chunk), dtype=torch.uint8)
    for done in range(0, count, chunk):
        scratch[:min(chunk, count - done)].random_(generator=generator)


def initial_weights(cfg: Config, model: nn.Module) -> TensorFor:
    """Where a run's initial weights come from: ``model.init_from``'s Hugging Face weights (read
    lazily, one tensor at a time: bigtrain/hf_import.py), else the seeded init at ``cfg.seed``."""
    if cfg.model.init_from:
        from bigtrain.hf_import import HFWeights  # the HF world is imported only when used
        weights = HFWeights(cfg.model.init_from, cfg.model)
        return lambda name, param, rows: _checked(name, weights(name), param.shape)[rows]
    return seeded(model, cfg.seed)


def is_meta(model: nn.Module) -> bool:
    """True when the model's parameters have no storage yet (built under ``torch.device("meta")``)."""
    return any(p.is_meta for p in model.parameters())


@torch.no_grad()
def materialize(model: nn.Module, tensor_for: TensorFor, device: torch.device | str | None = None) -> None:
    """Fill ``model``'s parameters in place from ``tensor_for``, this rank's part of each.

    A model on ``meta`` first gets (uninitialised) storage on ``device``, through
    ``to_empty``, which FSDP2 turns into storage for the local shards only. Parameters may
    be plain tensors (filled whole), DTensors (FSDP2, and any later mesh: the local box
    is found from the mesh and placements) or DeepSpeed ZeRO-3 partitions (gathered,
    written on rank 0, re-partitioned by DeepSpeed). Then the tied head is re-tied (a
    plain ``to_empty`` unties it) and the buffers that are not parameters (the RoPE
    tables) are recomputed.
    """
    if is_meta(model):
        if device is None:
            raise ValueError("materialize: the model is on meta; say on which device to build it")
        model.to_empty(device=device)
    model.tie_weights()
    for name, param in model.named_parameters():
        _write(name, param, tensor_for)
    model.init_buffers()


def on_device(model: nn.Module, cfg: Config, device: torch.device) -> nn.Module:
    """``model`` whole on ``device`` with its initial weights, for the backends that keep every
    parameter on every rank: a model on ``meta`` is materialised there from
    :func:`initial_weights`; one built whole already (tests, tools) is moved as it is."""
    if is_meta(model):
        materialize(model, initial_weights(cfg, model), device)
        return model
    return model.to(device)


def _checked(name: str, value: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if tuple(value.shape) != tuple(shape):
        raise ConfigError(f"initial weights: {name} has shape {tuple(value.shape)}, the model needs {tuple(shape)}")
    return value


def _rows(name: str, param: torch.Tensor, tensor_for: TensorFor, rows: slice) -> torch.Tensor:
    first, stop, _ = rows.indices(param.shape[0])
    return _checked(name, tensor_for(name, param, rows), (max(0, stop - first), *param.shape[1:]))


def _write(name: str, param: torch.Tensor, tensor_for: TensorFor) -> None:
    if hasattr(param, "ds_id"):  # a ZeRO-3 partition: DeepSpeed's documented way to change one
        import deepspeed
        import torch.distributed as dist
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if dist.get_rank() == 0:  # the others' values are overwritten by rank 0's on exit
                param.data.copy_(_rows(name, param, tensor_for, slice(0, param.shape[0])))
        return
    if not isinstance(param, DTensor):
        param.copy_(_rows(name, param, tensor_for, slice(0, param.shape[0])))
        return
    rows, *rest = _local_box(param)
    param.to_local().copy_(_rows(name, param, tensor_for, rows)[(slice(None), *rest)])


def _local_box(param) -> tuple[slice, ...]:
    """This rank's part of a DTensor as slices of the full tensor. The same function DCP uses
    to say where a shard lies in a checkpoint, so it holds for every layout DCP can save:
    ``Shard``/``Replicate`` over any mesh (FSDP2's uneven last shards included: the local
    tensor is the unpadded part) and FSDP2's strided shards over a tensor-parallel dim."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))

