"""Which prepared data a run reads, and whether its batch sizes fit the ranks.

Both are asked before anything is built (by ``bigtrain train`` before any process
group starts, by ``bigtrain launch`` before it spawns one, by ``inspect`` and
``preflight``), so they live here and not in the trainer: a tool that needs them
does not import the training loop.
"""
from __future__ import annotations

from bigtrain.config import Config, ConfigError
from bigtrain.data.dataset import PreparedData, open_data
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


def _same_tokenizer(cfg: Config, data: PreparedData, other: PreparedData) -> None:
    """Eval data made with another tokenizer would index the embedding with foreign ids: a crash
    in the final eval when its vocabulary is larger, a meaningless val_loss when it is not."""
    if other.vocab_size != data.vocab_size:
        differs = f"vocab_size {other.vocab_size} vs {data.vocab_size}"
    elif other.tokenizer_id != data.tokenizer_id:
        differs = f"the same vocab_size {data.vocab_size}, other token ids"
    else:
        return
    raise ConfigError(f"data.val_path {cfg.data.val_path!r} was prepared with another tokenizer than data.path "
                      f"{cfg.data.path!r} ({differs}); prepare it with --tokenizer {data.path / 'tokenizer'}")


def open_splits(cfg: Config, verify: bool = True):
    """(prepared data, train split, val split or None) for the configured data;
    ``verify`` re-hashes the shards (``bigtrain inspect`` skips that). Eval data from
    ``data.val_path`` must share the training data's tokenizer."""
    data = open_data(cfg.data.path, verify)
    train, val = data.split("train"), None
    if cfg.data.val_path:
        other = open_data(cfg.data.val_path, verify)
        _same_tokenizer(cfg, data, other)
        val = other.split("val" if other.has_split("val") else "train")
    elif data.has_split("val") and data.split("val").num_samples(cfg.model.seq_len) > 0:
        val = data.split("val")
    elif cfg.data.val_fraction > 0:
        train, val = train.tail(cfg.data.val_fraction)
    if train.num_samples(cfg.model.seq_len) == 0:
        raise ConfigError(f"data.path {cfg.data.path!r}: fewer than seq_len+1={cfg.model.seq_len + 1} "
                          "training tokens")
    return data, train, val
