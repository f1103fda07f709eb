"""Which prepared data a run reads, and whether its batch sizes fit the ranks.

Both are asked before anything is built (by ``bigtrain train`` before any process
group starts, by ``bigtrain launch`` before it spawns one, by ``inspect`` and
``preflight``), so they live here and not in the trainer: a tool that needs them
does not import the training loop.
"""
from __future__ import annotations

from bigtrain.config import Config, ConfigError
from bigtrain.data.dataset import open_data
from bigtrain.faults import check_faults


def check_world(cfg: Config, world: int) -> None:
    """Every batch size the run will use must split evenly over ranks and micro-batches;
    every fault it injects must exist in this world (:func:`bigtrain.faults.check_faults`)."""
    sizes = {cfg.batch.global_size}
    if cfg.batch.rampup is not None:
        sizes |= {cfg.batch.rampup.start, cfg.batch.rampup.increment}
    for size in sorted(sizes):
        if size % (cfg.batch.micro_size * world):
            raise ConfigError(f"config error: batch size {size} is not a multiple of "
                              f"batch.micro_size={cfg.batch.micro_size} x world size {world}")
    check_faults(cfg, world)


def open_splits(cfg: Config, verify: bool = True):
    """(prepared data, train split, val split or None) for the configured data;
    ``verify`` re-hashes the shards (``bigtrain inspect`` skips that)."""
    data = open_data(cfg.data.path, verify)
    train, val = data.split("train"), None
    if cfg.data.val_path:
        other = open_data(cfg.data.val_path, verify)
        val = other.split("val" if other.has_split("val") else "train")
    elif data.has_split("val") and data.split("val").num_samples(cfg.model.seq_len) > 0:
        val = data.split("val")
    elif cfg.data.val_fraction > 0:
        train, val = train.tail(cfg.data.val_fraction)
    if train.num_samples(cfg.model.seq_len) == 0:
        raise ConfigError(f"data.path {cfg.data.path!r}: fewer than seq_len+1={cfg.model.seq_len + 1} "
                          "training tokens")
    return data, train, val
