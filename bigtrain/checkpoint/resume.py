"""Which checkpoint to start from, and reading a checkpoint's model outside training.

:func:`select` is the resume policy (``checkpoint.resume`` and ``checkpoint.fallback``);
it only reads, so the CLI runs it before any process starts and the
:class:`~bigtrain.checkpoint.checkpointer.Checkpointer` runs it again to resume.
:func:`find` and :func:`load_model` serve the tools (``export``, ``inspect``, tests).
"""
from __future__ import annotations

from pathlib import Path

import torch

from bigtrain.checkpoint.format import META, committed, problem, read_meta, weights_only_loads
from bigtrain.config import Config, ConfigError, ModelConfig


def select(cfg: Config, world: int, verify: bool = True, reader=None) -> tuple[Path | None, list[str]]:
    """The checkpoint ``checkpoint.resume`` asks for, and the problems of newer ones passed over;
    ``reader`` is the backend (class) that will load it (see :func:`format.config_mismatch`).

    ``auto``: the newest committed checkpoint in ``RUN_DIR/checkpoints``; if it is unusable,
    older ones only with ``checkpoint.fallback: true``. ``never``: none, and refused when the
    run directory holds committed checkpoints (two runs' checkpoints never mix). A path inside this
    run's checkpoints: exactly that one (a manual rollback). A path elsewhere (starting from
    another run) counts only until this run has committed checkpoints of its own; after
    that, a restarted job goes on from its own newest, as with ``auto``, instead of losing
    its progress. Raises :class:`ConfigError` with one line when nothing usable is found.
    Reads, never deletes.
    """
    mode, root = cfg.checkpoint.resume, Path(cfg.run_dir) / "checkpoints"
    own = committed(root)
    if mode == "never":
        if own:  # starting over here would mix two runs' checkpoints, and `auto` would resume the old one
            raise ConfigError(f"checkpoint.resume=never, but {root} holds another run's checkpoints "
                              f"({len(own)}, the newest step {own[-1][0]}); use another run_dir, or move "
                              "those checkpoints away to start over here")
        return None, []
    if mode != "auto" and not (own and Path(mode).resolve().parent != root.resolve()):
        why = problem(Path(mode), cfg, world, verify, reader)
        if why:
            raise ConfigError(f"checkpoint.resume: {why}")
        return Path(mode), []
    passed: list[str] = []
    for _, path in reversed(own):
        why = problem(path, cfg, world, verify, reader)
        if why is None:
            return path, passed
        if not cfg.checkpoint.fallback:
            raise ConfigError(f"{why}; set checkpoint.fallback=true to resume from an older checkpoint, "
                              "or checkpoint.resume=never to start over")
        passed.append(why)
    if passed:
        raise ConfigError(f"no loadable checkpoint in {root}; the newest: {passed[0]}")
    return None, []


def find(run_dir: str | Path, step: int | None = None) -> Path:
    """The committed checkpoint of ``run_dir`` at ``step`` (default: the newest), or
    ``run_dir`` itself when it is a checkpoint directory."""
    run_dir = Path(run_dir)
    if (run_dir / META).is_file():
        return run_dir
    found = dict(committed(run_dir / "checkpoints"))
    if not found:
        raise ConfigError(f"{str(run_dir)!r} holds no committed checkpoint (looked in {run_dir / 'checkpoints'})")
    if step is None:
        return found[max(found)]
    if step not in found:
        raise ConfigError(f"{str(run_dir)!r} has no checkpoint for step {step}; committed: {sorted(found)}")
    return found[step]


def load_model(run_dir: str | Path, step: int | None = None, ema: bool = False):
    """bigtrain's own model with the consolidated weights of a checkpoint (fp32, CPU, eval mode),
    whatever backend and world size wrote it; with ``ema``, the EMA of the weights instead
    (``ema.decay`` > 0 in the run). ``run_dir`` may also be a checkpoint directory."""
    from bigtrain.model.gpt import GPT
    path = find(run_dir, step)
    why = problem(path)
    if why:
        raise ConfigError(why)
    meta = read_meta(path)
    model = GPT(ModelConfig.model_validate(meta["config"]["model"]))
    no_ema = f"checkpoint {str(path)!r} holds no EMA of the weights (its run had ema.decay=0)"
    if meta["checkpoint_format"] == "deepspeed" and ema:  # each rank's EMA of its ZeRO partitions, gathered
        from bigtrain.ema import consolidate
        with weights_only_loads():
            state = consolidate(path, {n: p.shape for n, p in model.named_parameters()})
        if state is None:
            raise ConfigError(no_ema)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(state[n])
        return model.eval()
    if meta["checkpoint_format"] == "deepspeed":  # ZeRO partitions of the fp32 master weights, gathered
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        with weights_only_loads():
            model.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name))
        return model.eval()
    from bigtrain.checkpoint import dcp_io
    if ema and not dcp_io.holds(path, "ema"):
        raise ConfigError(no_ema)
    # in place, into tensors that share the parameters' storage (a tied head follows its embedding)
    state = {"ema": {"weights": {n: p.detach() for n, p in model.named_parameters()}}} if ema \
        else {"model": model.state_dict()}
    dcp_io.load(state, path, distributed=False)
    return model.eval()
