"""Which prepared data a run reads, and whether its batch sizes fit the ranks.

Both are asked before anything is built (by ``bigtrain train`` before any process
group starts, by ``bigtrain launch`` before it spawns one, by ``inspect`` and
``preflight``), so they live here and not in the trainer: a tool that needs them
does not import the training loop.
"""
from __future__ import annotations

from bigtrain.config import Config, ConfigError
from bigtrain.data.dataset import MixedSplit, PreparedData, open_data
from bigtrain.faults import check_faults
from bigtrain.parallel.tp import check_tp


def check_world(cfg: Config, world: int) -> None:
    """The tensor-parallel layout must split the model and the world (:func:`bigtrain.parallel.tp.check_tp`);
    every batch size the run will use must split evenly over data-parallel ranks (world / tp) and
    micro-batches; every fault it injects must exist in this world (:func:`bigtrain.faults.check_faults`)."""
    check_tp(cfg, world)
    dp = world // cfg.parallel.tp  # a tp group reads the same rows: the batch splits over dp ranks
    ranks = f"world size {world}" if dp == world else f"data-parallel size {dp} (world {world} / tp {cfg.parallel.tp})"
    sizes = {cfg.batch.global_size}
    if cfg.batch.rampup is not None:
        sizes |= {cfg.batch.rampup.start, cfg.batch.rampup.increment}
    for size in sorted(sizes):
        if size % (cfg.batch.micro_size * dp):
            raise ConfigError(f"config error: batch size {size} is not a multiple of "
                              f"batch.micro_size={cfg.batch.micro_size} x {ranks}")
    check_faults(cfg, world)


def _same_tokenizer(data: PreparedData, other: PreparedData, what: str) -> None:
    """Data made with another tokenizer would index the embedding with foreign ids: a crash when
    its vocabulary is larger (in the final eval, for eval data), meaningless losses when it is not."""
    if other.vocab_size != data.vocab_size:
        differs = f"vocab_size {other.vocab_size} vs {data.vocab_size}"
    elif other.tokenizer_id != data.tokenizer_id:
        differs = f"the same vocab_size {data.vocab_size}, other token ids"
    else:
        return
    raise ConfigError(f"{what} was prepared with another tokenizer than data.path {str(data.path)!r} ({differs}); "
                      f"prepare it with --tokenizer {data.path / 'tokenizer'}")


def _train_and_val(cfg: Config, data: PreparedData, what: str):
    """(train split, val split or None) of one prepared dir: its own val split, else a
    ``data.val_fraction`` tail of its train tokens (neither when ``data.val_path`` gives the eval data)."""
    train, val = data.split("train"), None
    own_val = data.has_split("val") and data.split("val").num_samples(cfg.model.seq_len) > 0
    if own_val and not cfg.data.val_path:
        val = data.split("val")
    elif cfg.data.val_fraction > 0 and not cfg.data.val_path:
        train, val = train.tail(cfg.data.val_fraction)
    if train.num_samples(cfg.model.seq_len) == 0:
        raise ConfigError(f"{what}: fewer than seq_len+1={cfg.model.seq_len + 1} training tokens")
    return train, val


def _open_sources(cfg: Config, verify: bool):
    """A mixture's sources as one sample space (:class:`MixedSplit`); they must share the first's tokenizer."""
    opened, trains, vals = [], [], []
    for i, source in enumerate(cfg.data.sources):
        what = f"data.sources[{i}] {source.path!r}"
        data = open_data(source.path, verify)
        if opened:
            _same_tokenizer(opened[0], data, what)
        train, val = _train_and_val(cfg, data, what)
        opened.append(data)
        trains.append(train)
        vals.append(val)
    names = [s.name for s in cfg.data.sources]
    has_val = [i for i, v in enumerate(vals) if v is not None and v.num_samples(cfg.model.seq_len) > 0]
    val = MixedSplit([names[i] for i in has_val], [vals[i] for i in has_val]) if has_val else None
    return opened[0], MixedSplit(names, trains, opened), val


def open_splits(cfg: Config, verify: bool = True):
    """(prepared data, train split, val split or None) for the configured data;
    ``verify`` re-hashes the shards (``bigtrain inspect`` skips that). Eval data from
    ``data.val_path`` must share the training data's tokenizer. With ``data.sources`` the
    prepared data is the first source's (its tokenizer) and the splits are :class:`MixedSplit`."""
    if cfg.data.sources:
        data, train, val = _open_sources(cfg, verify)
    else:
        data = open_data(cfg.data.path, verify)
        train, val = _train_and_val(cfg, data, f"data.path {cfg.data.path!r}")
    if cfg.data.val_path:
        other = open_data(cfg.data.val_path, verify)
        _same_tokenizer(data, other, f"data.val_path {cfg.data.val_path!r}")
        val = other.split("val" if other.has_split("val") else "train")
    return data, train, val
