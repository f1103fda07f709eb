"""Sharded initialisation: every rank fills only its own part of each parameter.

A run builds its model on the ``meta`` device (shapes, no storage), the backend lays
it out (FSDP2 shards it, DeepSpeed ZeRO-3 partitions it, the others keep it whole)
and only then are the weights written, by :func:`materialize`, one parameter at a
time: the *source* (``tensor_for(name, param)``) gives the parameter whole, as a fp32
CPU tensor, and the rank copies in the part it holds and drops the rest. A rank's
peak host memory while building is therefore its own shards plus the largest single
parameter (ZeRO-3: plus it once more, gathered), not the whole model (``bench/init.py``
measures it).

The default source is :func:`seeded`: parameter ``name`` is drawn by the model's own
rule (:meth:`GPT.initial_value`) from a CPU ``torch.Generator`` seeded by
``blake2b(seed, name)``. Its values depend on nothing but the seed and the name, not
on the order parameters are built in, the device, the world size or the layout, so a
one-process run and any sharded run start from bitwise the same weights (the data
order already gives them the same batches). The cost is that every rank draws every
parameter in full (CPU time proportional to the whole model, not to its shard).

Another source plugs in the same way: ``init_from`` (continued pretraining from a
Hugging Face checkpoint) returns each parameter's tensor by name, and the rest (only
this rank's slice is kept) is unchanged. :func:`initial_weights` is the one place that
chooses the source of a run.
"""
from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from bigtrain.errors import ConfigError

if TYPE_CHECKING:
    from bigtrain.config import Config

# ``model`` below is a bigtrain.model.gpt.GPT (not imported: gpt.py imports this module); besides
# its parameters this module uses its initial_value(name, shape, generator), tie_weights() and
# init_buffers().

# tensor_for(name, param) -> the parameter's full value: fp32, on the CPU, of shape
# ``param.shape`` (the global shape, also for a DTensor shard; ``name`` as in
# ``model.named_parameters()``; a tied weight is asked for once, under its first name).
# Called once per parameter on every rank (ZeRO-3: on rank 0 only), in any order.
TensorFor = Callable[[str, torch.Tensor], torch.Tensor]


def param_seed(seed: int, name: str) -> int:
    """The generator seed of parameter ``name``: a hash, so neighbouring names or seeds
    give unrelated streams and no parameter's values depend on another's."""
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # torch seeds are at most 2**63 - 1 here


def seeded(model: nn.Module, seed: int) -> TensorFor:
    """The project's init as a source: ``model.initial_value(name, shape, generator)`` with a
    fresh CPU generator seeded by :func:`param_seed` for each parameter."""
    def tensor_for(name: str, param: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator(device="cpu").manual_seed(param_seed(seed, name))
        return model.initial_value(name, param.shape, generator)
    return tensor_for


def initial_weights(cfg: Config, model: nn.Module) -> TensorFor:
    """Where a run's initial weights come from: ``model.init_from``'s Hugging Face weights (read
    lazily, one tensor at a time: bigtrain/hf_import.py), else the seeded init at ``cfg.seed``."""
    if cfg.model.init_from:
        from bigtrain.hf_import import HFWeights  # the HF world is imported only when used
        weights = HFWeights(cfg.model.init_from, cfg.model)
        return lambda name, param: weights(name)
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


def _full(name: str, param: torch.Tensor, tensor_for: TensorFor) -> torch.Tensor:
    value = tensor_for(name, param)
    if tuple(value.shape) != tuple(param.shape):
        raise ConfigError(f"initial weights: {name} has shape {tuple(value.shape)}, "
                          f"the model needs {tuple(param.shape)}")
    return value


def _write(name: str, param: torch.Tensor, tensor_for: TensorFor) -> None:
    if hasattr(param, "ds_id"):  # a ZeRO-3 partition: DeepSpeed's documented way to change one
        import deepspeed
        import torch.distributed as dist
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if dist.get_rank() == 0:  # the others' values are overwritten by rank 0's on exit
                param.data.copy_(_full(name, param, tensor_for))
        return
    full = _full(name, param, tensor_for)
    if isinstance(param, DTensor):
        full, param = full[_local_box(param)], param.to_local()
    param.copy_(full)


def _local_box(param) -> tuple[slice, ...]:
    """This rank's part of a DTensor as slices of the full tensor. The same function DCP uses
    to say where a shard lies in a checkpoint, so it holds for every layout DCP can save:
    ``Shard``/``Replicate`` over any mesh (FSDP2's uneven last shards included: the local
    tensor is the unpadded part) and FSDP2's strided shards over a tensor-parallel dim."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))

