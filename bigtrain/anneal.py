"""``bigtrain anneal``: a new run that decays the LR from a stable checkpoint of another run.

Warmup-stable-decay (``schedule.decay: wsd``) holds the peak LR for as long as the run
goes on, so any checkpoint of its stable phase can be cooled down into a finished model,
and one long run yields several: anneal from step 20k for 2k steps, from 40k for 4k, ...
while the stable run itself goes on. The anneal is a new run directory whose config is
the source checkpoint's own (``meta.json``: the resolved config it was written with),
with:

* ``run_dir``: the new directory; ``checkpoint.resume``: the source checkpoint (weights,
  optimizer, EMA, data position, skip ledger, guard). As for any path from another run,
  it counts until the anneal has checkpoints of its own: a preempted anneal resumes itself.
* ``schedule.decay: wsd`` with ``decay_start`` = the checkpoint's update count (the LR
  follows applied updates, see :mod:`bigtrain.optim`), ``decay_steps`` = D and
  ``max_steps`` = the checkpoint's step + D: the decay starts at the resumed step.
* ``faults`` back to their defaults (they were the source run's deliberate test faults).

Files and ``key=value`` overrides given on the command line apply over that (a new
mixture, another ``decay_shape``, a smaller ``optim.lr``), overrides last. Starting from
the source's resolved config is what keeps accidental changes out: the seed, the data
and the model are the source's unless written, and changing the data order is still
refused at load unless ``checkpoint.accept_data_change`` says it is meant. An anneal that
would start above the LR the source had at that update (a checkpoint from the warmup,
a cosine run, or another anneal) is refused with one line: it would jump the LR up.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from bigtrain.checkpoint.format import STATE, committed, problem, read_meta
from bigtrain.checkpoint.resume import find
from bigtrain.config import Config, ConfigError, build_config, resolve_vocab
from bigtrain.config_files import read_tree
from bigtrain.optim import base_lr


def anneal_config(source: str | Path, step: int | None, out: str | Path, decay_steps: int,
                  files: list[str] = (), overrides: list[str] = ()) -> Config:
    """The config of an anneal of ``source``'s checkpoint at ``step`` (default: its newest)
    into run directory ``out`` over ``decay_steps`` updates."""
    path = find(source, step)
    if why := problem(path, verify=False):  # the full check (CRCs) runs before training starts
        raise ConfigError(why)
    if Path(out).resolve() == Path(source).resolve():
        raise ConfigError(f"anneal: --out {str(out)!r} is the source run; anneal into a new run directory")
    tree = read_meta(path)["config"]
    tree.pop("faults", None)
    train = torch.load(path / STATE, weights_only=True)["train"]
    ours = {"run_dir": str(out), "checkpoint.resume": str(path.resolve()), "schedule.decay": "wsd",
            "schedule.decay_steps": decay_steps, "schedule.decay_fraction": None,
            "schedule.decay_start": int(train["updates"]), "schedule.max_steps": int(train["step"]) + decay_steps}
    ours = [f"{key}={json.dumps(value)}" for key, value in ours.items()]
    cfg = resolve_vocab(build_config(read_tree(files, [*ours, *overrides], base=tree)))
    source_cfg = build_config(read_meta(path)["config"])
    before, after = base_lr(int(train["updates"]), source_cfg), base_lr(cfg.schedule.stable_until(), cfg)
    if after > before * (1 + 1e-6):
        raise ConfigError(f"anneal: {path} ran at LR {before:.3g} (before batch scaling) and the anneal would "
                          f"start at {after:.3g}; anneal from a checkpoint of a stable phase, or set optim.lr")
    _check_same_anneal(Path(out), cfg)
    return cfg


def _check_same_anneal(out: Path, cfg: Config) -> None:
    """Running the command again resumes the anneal in ``out`` (e.g. after a preemption); the
    same ``out`` with another source or schedule would silently go on with the old one: refused."""
    if not committed(out / "checkpoints") or not (out / "config.yaml").is_file():
        return
    saved, ours = yaml.safe_load((out / "config.yaml").read_text()), cfg.to_dict()
    for section, key in (("checkpoint", "resume"), ("schedule", None)):
        theirs, mine = saved.get(section, {}), ours[section]
        theirs, mine = (theirs.get(key), mine[key]) if key else (theirs, mine)
        if theirs != mine:
            raise ConfigError(f"anneal: {str(out)!r} already holds an anneal with {section}"
                              f"{'.' + key if key else ''} {theirs}; this one has {mine}: use another --out "
                              "(the same command again resumes that anneal)")
