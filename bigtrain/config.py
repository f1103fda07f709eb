"""The typed schema of a run.

YAML files (later ones win) plus ``a.b.c=value`` overrides (they win over every
file) give a :class:`Config`. A file may start from another with a top-level
``base: OTHER.yaml`` (relative to the file that names it), so a variant of a recipe
holds only what differs; the command line layers files the same way
(``bigtrain train base.yaml delta.yaml key=value``). Every section is a small pydantic model with ``extra="forbid"``,
so a typo is an error that names the key and suggests the nearest valid one,
instead of a silently ignored setting discovered three days into a run.

Bad input raises :class:`ConfigError` with one line naming the key, the value and
what was expected; the CLI turns it into exit status 2. The schema refuses what
training cannot use, before anything runs or is written: NaN or infinity in any
float (``1e400`` parses as inf and passes ``> 0``), AdamW betas outside [0, 1), a
``schedule.min_lr`` above the peak ``optim.lr``, a ramp-up that never lands on
``batch.global_size``, an empty ``run_dir`` (an unset shell variable; it would write
into the working directory), a seed the RNGs cannot take. Reading the files (UTF-8,
``base:``, duplicate keys, overrides) is :mod:`bigtrain.config_files`; the sections are
:mod:`bigtrain.config_sections`.
"""
from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from bigtrain.config_files import read_tree, split_args
from bigtrain.config_sections import (  # noqa: F401  (re-exported: the names code imports from here)
    MODEL_PRESETS, Beta, BatchConfig, CheckpointConfig, DataConfig, EMAConfig, EvalConfig, FaultsConfig,
    LoggingConfig, ModelConfig, OptimConfig, ParallelConfig, ProfileConfig, RampupConfig, ScheduleConfig,
    Section, SourceConfig, StabilityConfig, WandbConfig)
from bigtrain.errors import ConfigError


class Config(Section):
    run_dir: str = Field("runs/default", min_length=1, description="everything a run writes goes under here")
    # numpy's seed range; beyond 64 bits torch.manual_seed raises a traceback, and the per-rank
    # and fault seeds derived from the seed add to it
    seed: int = Field(1234, ge=0, lt=2**32, description="seeds init, the sample order and dropout")
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    batch: BatchConfig = BatchConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    ema: EMAConfig = EMAConfig()
    parallel: ParallelConfig = ParallelConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    stability: StabilityConfig = StabilityConfig()
    eval: EvalConfig = EvalConfig()
    logging: LoggingConfig = LoggingConfig()
    faults: FaultsConfig = FaultsConfig()
    profile: ProfileConfig = ProfileConfig()

    @model_validator(mode="after")
    def _check_lr(self) -> "Config":
        # both are at batch.reference_size and scale by the same rule, so they compare as written
        if self.schedule.min_lr > self.optim.lr:
            raise ValueError(f"schedule.min_lr={self.schedule.min_lr:g} is above the peak optim.lr="
                             f"{self.optim.lr:g}: the schedule would decay upwards")
        return self

    def to_dict(self) -> dict:
        return json.loads(self.model_dump_json(by_alias=True))

    def reference_batch(self) -> int:
        return self.batch.reference_size or self.batch.global_size


# ---------------------------------------------------------------- loading

def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that owns the key at ``loc`` (for 'did you mean')."""
    model: Any = Config
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return None
        ann = field.annotation
        for cand in (ann, *getattr(ann, "__args__", ())):
            if isinstance(cand, type) and issubclass(cand, BaseModel):
                model = cand
                break
        else:
            return None
    return model


def _describe(err: dict) -> str:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    key = ".".join(str(p) for p in loc)
    if err["type"] == "extra_forbidden":
        owner = _model_at(loc)
        names = [a for f, info in (owner.model_fields.items() if owner else []) for a in (f, info.alias) if a]
        close = difflib.get_close_matches(str(loc[-1]), names, n=1)
        hint = f" (did you mean {'.'.join(map(str, loc[:-1] + (close[0],)))!r}?)" if close else ""
        return f"config error: {key}: unknown key{hint}"
    value = err.get("input")
    msg = err["msg"].removeprefix("Value error, ")
    shown = "" if isinstance(value, dict) else f" = {value!r}"
    return f"config error: {key}{shown}: {msg}" if key else f"config error: {msg}"


def build_config(tree: dict) -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_describe(e.errors()[0])) from None


def resolve_vocab(cfg: Config) -> Config:
    """Fill ``model.vocab_size: auto`` (and ``model.eot_id: auto`` when ``doc_mask`` uses it) from the
    prepared data's manifest, when present."""
    eot_auto = cfg.model.doc_mask and cfg.model.eot_id == "auto"
    if cfg.model.vocab_size != "auto" and not eot_auto:
        return cfg
    manifest = Path(cfg.data.path) / "manifest.json"
    if not manifest.is_file():
        return cfg
    try:
        tree = json.loads(manifest.read_bytes())
    except (OSError, ValueError) as e:
        raise ConfigError(f"data.path {cfg.data.path!r}: manifest.json is unreadable ({e})") from None
    vocab = tree.get("vocab_size") if isinstance(tree, dict) else None
    if type(vocab) is not int or vocab < 2:
        raise ConfigError(f"data.path {cfg.data.path!r}: manifest.json has no vocab_size that is an integer "
                          f">= 2 (found {vocab!r})")
    if cfg.model.vocab_size == "auto":
        cfg.model.vocab_size = vocab
    if eot_auto:
        eot = tree.get("eot_id")
        if type(eot) is not int or not 0 <= eot < vocab:
            raise ConfigError(f"data.path {cfg.data.path!r}: manifest.json has no eot_id inside the vocabulary "
                              f"(found {eot!r})")
        cfg.model.eot_id = eot
    return cfg


def adopt_init_from(cfg: Config) -> Config:
    """With ``model.init_from``, the Hugging Face directory's config.json decides the architecture
    (:func:`bigtrain.hf_format.model_fields`; a key set here that contradicts it is an error)."""
    if not cfg.model.init_from:
        return cfg
    from bigtrain.hf_format import model_fields
    section = model_fields(cfg.model.init_from, cfg.model.model_dump(exclude_unset=True))
    try:
        cfg.model = ModelConfig.model_validate(section)
    except ValidationError as e:
        why = e.errors()[0]["msg"].removeprefix("Value error, ")
        raise ConfigError(f"config error: model.init_from {cfg.model.init_from!r}: {why}") from None
    return cfg


def load_config(*paths: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Layer YAML files in order (each over its ``base:`` chain), then ``key=value`` overrides;
    validate; take the architecture of ``model.init_from``; resolve ``vocab_size: auto``."""
    return resolve_vocab(adopt_init_from(build_config(read_tree(paths, overrides))))


def config_from_args(args: list[str] | tuple[str, ...]) -> Config:
    """The config that ``bigtrain train|launch|preflight FILE... key=value...`` names."""
    files, overrides = split_args(args)
    return load_config(*files, overrides=overrides)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
