"""Sharded checkpoints: save, atomic commit, retention, resume discovery, load.

A checkpoint is everything needed to continue as if nothing happened: the model
and optimizer shards (``backend.save_sharded``: DCP for none and fsdp, DeepSpeed's
own format for deepspeed), the trainer's state (``Trainer.train_state()``: data
position, samples, tokens, skip ledger, stability guard), each rank's RNG states
and the resolved config. The layout and the checks are in
:mod:`bigtrain.checkpoint_format`.

The commit protocol, the same for sync and async saves:

1. rank 0 makes ``step-XXXXXXXX.tmp``; every rank writes its own small files, then
   its shards;
2. once a rank's shards are on disk it waits for the others (a barrier), then
   checksums its share of the files, and the checksums go to rank 0;
3. rank 0 writes ``manifest.json``, fsyncs, renames the directory to
   ``step-XXXXXXXX`` (the commit), and deletes all but the ``checkpoint.keep`` newest.

A crash anywhere before the rename leaves a ``.tmp`` that is never loaded and is
deleted when the next run starts. With ``checkpoint.async: true`` step 1 returns
once the shards are copied to CPU, and steps 2-3 run in a background thread
(DCP's ``async_save`` with its collectives on a gloo group of their own); the
next save, a load and the end of training wait for it.

Every collective here runs on every rank in the same order: rank 0 decides
(which checkpoint to resume, whether it is sound) and broadcasts the decision.
"""
from __future__ import annotations

import io
import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from bigtrain.checkpoint_format import (FORMAT_VERSION, META, committed, digest, fsync_dir, incomplete,
                                        listing, problem, read_meta, step_dir, tmp_dir, weights_only_loads,
                                        write_manifest, write_synced)
from bigtrain.config import Config, ConfigError, ModelConfig
from bigtrain.parallel.env import DistEnv, rng_state, set_rng_state

TRAIN_STATE = "train_state.pt"


def rng_file(rank: int) -> str:
    return f"rng-{rank:05d}.pt"


def _to_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _portable_rng(state: dict) -> dict:
    """numpy's RNG state holds an ndarray, which ``weights_only`` loading refuses; use a tensor."""
    name, keys, pos, has_gauss, gauss = state["numpy"]
    return {**state, "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}


def _native_rng(state: dict) -> dict:
    name, keys, pos, has_gauss, gauss = state["numpy"]
    return {**state, "numpy": (name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss)}


def select(cfg: Config, world: int, verify: bool = True) -> tuple[Path | None, list[str]]:
    """The checkpoint ``checkpoint.resume`` asks for, and the problems of newer ones passed over.

    ``auto``: the newest committed checkpoint in ``RUN_DIR/checkpoints``; if it is unusable,
    older ones only with ``checkpoint.fallback: true``. ``never``: none. A path inside this
    run's checkpoints: exactly that one (a manual rollback). A path elsewhere (starting from
    another run) counts only until this run has committed checkpoints of its own; after
    that, a restarted job goes on from its own newest, as with ``auto``, instead of losing
    its progress. Raises :class:`ConfigError` with one line when nothing usable is found.
    Reads, never deletes.
    """
    mode, root = cfg.checkpoint.resume, Path(cfg.run_dir) / "checkpoints"
    if mode == "never":
        return None, []
    own = committed(root)
    if mode != "auto" and not (own and Path(mode).resolve().parent != root.resolve()):
        why = problem(Path(mode), cfg, world, verify)
        if why:
            raise ConfigError(f"checkpoint.resume: {why}")
        return Path(mode), []
    passed: list[str] = []
    for _, path in reversed(own):
        why = problem(path, cfg, world, verify)
        if why is None:
            return path, passed
        if not cfg.checkpoint.fallback:
            raise ConfigError(f"{why}; set checkpoint.fallback=true to resume from an older checkpoint, "
                              "or checkpoint.resume=never to start over")
        passed.append(why)
    if passed:
        raise ConfigError(f"no loadable checkpoint in {root}; the newest: {passed[0]}")
    return None, []


class Checkpointer:
    def __init__(self, cfg: Config, env: DistEnv):
        self.cfg, self.env = cfg, env
        self.root = Path(cfg.run_dir) / "checkpoints"
        # DeepSpeed writes through its own engine, which has no async path here.
        self.async_save = cfg.checkpoint.async_save and cfg.parallel.backend != "deepspeed"
        # Checkpoint collectives get a gloo group of their own, so a writer thread never
        # shares a communicator with the training loop.
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self.stager = None
        self.pending: threading.Thread | None = None
        self.hold = None  # the optimizer pre-step hook that waits for an async save's CPU copy
        self.blocked_s = 0.0  # time the training loop has waited on checkpoints: in save() and held updates
        self.error: BaseException | None = None
        self.last_step: int | None = None  # the step whose state is saved (or was loaded)

    # ------------------------------------------------------------------ collectives
    def _barrier(self) -> None:
        if self.env.distributed:
            dist.barrier(group=self.group)

    def _broadcast(self, obj):
        if not self.env.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def _merge(self, mine: dict) -> dict:
        if not self.env.distributed:
            return mine
        parts: list = [None] * self.env.world
        dist.all_gather_object(parts, mine, group=self.group)
        return {k: v for part in parts for k, v in part.items()}

    # ------------------------------------------------------------------ saving
    def committed(self) -> list[tuple[int, Path]]:
        """Committed checkpoints, ascending by step (after any pending commit; the same on every rank)."""
        self.wait()
        return committed(self.root)

    def save(self, trainer) -> Path:
        """Commit ``step-XXXXXXXX`` for ``trainer.state.step``; a no-op if this state is already saved."""
        step = trainer.state.step
        final = step_dir(self.root, step)
        if step == self.last_step:
            return final
        t0 = time.perf_counter()
        self.wait()
        tmp = tmp_dir(final)
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self._barrier()
        self._write_own_files(trainer, tmp)
        if self.async_save:
            if self.stager is None:
                from bigtrain.parallel.dcp_io import make_stager
                self.stager = make_stager(self.env.device)
            response = trainer.backend.async_save_sharded(tmp, self.group, self.stager)
            # The copy to CPU overlaps the next forward and backward; only the update, which
            # would change what is being copied, waits for it.
            staged = response.staging_completion
            self.hold = trainer.backend.optimizer.register_step_pre_hook(lambda *_: self._held(staged))
            self.pending = threading.Thread(target=self._commit_in_background, name="checkpoint-commit",
                                            args=(response.upload_completion.result, step, tmp, final, trainer),
                                            daemon=True)
            self.pending.start()
        else:
            trainer.backend.save_sharded(tmp)
            self._commit(lambda: None, step, tmp, final, trainer)
        self.last_step = step
        self.blocked_s += time.perf_counter() - t0
        return final

    def _held(self, staged) -> None:
        t0 = time.perf_counter()
        staged.result()
        self.blocked_s += time.perf_counter() - t0

    def _write_own_files(self, trainer, tmp: Path) -> None:
        """The small files, written now (even when the shards go async) so they hold this step."""
        if self.env.is_main:
            meta = {"format_version": FORMAT_VERSION, "step": trainer.state.step, "world_size": self.env.world,
                    "backend": self.cfg.parallel.backend, "time": time.time(), "config": self.cfg.to_dict()}
            write_synced(tmp / META, (json.dumps(meta, indent=1) + "\n").encode())
            write_synced(tmp / TRAIN_STATE, _to_bytes(trainer.train_state()))
        write_synced(tmp / rng_file(self.env.rank), _to_bytes(_portable_rng(rng_state())))

    def _commit(self, written, step: int, tmp: Path, final: Path, trainer) -> None:
        written()                     # this rank's shards are on disk
        trainer.faults.crash_in_checkpoint(step)  # test hook (off by default): kill -9 right here
        self._barrier()               # ... and every rank's
        names = listing(tmp)
        digests = self._merge({n: digest(tmp / n) for n in names[self.env.rank::self.env.world]})
        error = None
        if self.env.is_main:
            try:
                write_manifest(tmp, digests)
                fsync_dir(tmp)
                if final.exists():    # the same step saved again, after a rollback
                    shutil.rmtree(final)
                tmp.rename(final)     # the commit
                fsync_dir(self.root)
                for _, old in committed(self.root)[:-self.cfg.checkpoint.keep]:
                    shutil.rmtree(old, ignore_errors=True)
            except OSError as e:
                error = f"checkpoint {final}: commit failed: {e}"
        error = self._broadcast(error)
        if error:
            raise RuntimeError(error)
        trainer.metrics.text(f"checkpoint: saved {final}")

    def _commit_in_background(self, *args) -> None:
        try:
            self._commit(*args)
        except BaseException as e:  # noqa: BLE001 - re-raised on the training thread by wait()
            self.error = e

    def wait(self) -> None:
        """Finish a pending async save, commit included; re-raise what went wrong in it."""
        if self.pending is not None:
            self.pending.join()
            self.pending = None
        if self.hold is not None:
            self.hold.remove()
            self.hold = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    # ------------------------------------------------------------------ loading
    def load(self, trainer, path: Path) -> None:
        """Restore model, optimizer, train state, skip ledger, guard state and RNG from ``path``.

        Rank 0 checks the checkpoint (reading every byte once per process) and tells the others.
        """
        self.wait()
        path = Path(path)
        why = problem(path, self.cfg, self.env.world, verify=True) if self.env.is_main else None
        why = self._broadcast(why)
        if why:
            raise ConfigError(why)
        with weights_only_loads():
            trainer.backend.load_sharded(path)
        trainer.load_train_state(torch.load(path / TRAIN_STATE, weights_only=True))
        own_rng = path / rng_file(self.env.rank)
        if own_rng.is_file():
            set_rng_state(_native_rng(torch.load(own_rng, weights_only=True)))
        saved_world = read_meta(path)["world_size"]
        if saved_world != self.env.world:
            trainer.metrics.text(f"checkpoint: written by {saved_world} ranks, loaded on {self.env.world}; "
                                 "ranks without a saved RNG state keep their seeded one")
        self.last_step = trainer.state.step

    def resume(self, trainer) -> bool:
        """Per ``checkpoint.resume``; True if a checkpoint was loaded. Deletes unfinished
        writes first: a ``.tmp`` is never loaded, whatever it holds."""
        if self.env.is_main:
            for stale in incomplete(self.root):
                shutil.rmtree(stale, ignore_errors=True)
                trainer.metrics.text(f"checkpoint: removed unfinished write {stale}")
        choice = None
        if self.env.is_main:
            try:
                choice = select(self.cfg, self.env.world)
            except ConfigError as e:
                choice = str(e)
        choice = self._broadcast(choice)
        if isinstance(choice, str):
            raise ConfigError(choice)
        path, passed = choice
        for why in passed:
            trainer.metrics.text(f"checkpoint: {why}; falling back to an older one (checkpoint.fallback)")
        if path is None:
            return False
        self.load(trainer, path)
        step = trainer.state.step
        trainer.metrics.text(f"checkpoint: resumed from {path} at step {step}")
        trainer.ledger.record("resume", step, path=str(path), passed_over=passed)
        return True


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


def load_model(run_dir: str | Path, step: int | None = None):
    """bigtrain's own model with the consolidated weights of a checkpoint (fp32, CPU, eval mode),
    whatever backend and world size wrote it. ``run_dir`` may also be a checkpoint directory."""
    from bigtrain.model.gpt import GPT
    path = find(run_dir, step)
    why = problem(path)
    if why:
        raise ConfigError(why)
    meta = read_meta(path)
    model = GPT(ModelConfig.model_validate(meta["config"]["model"]))
    if meta["backend"] == "deepspeed":  # ZeRO partitions of the fp32 master weights, gathered
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        with weights_only_loads():
            state = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    else:
        from bigtrain.parallel import dcp_io
        state = {"model": model.state_dict()}
        dcp_io.load(state, path, distributed=False)
        state = state["model"]
    model.load_state_dict(state)
    return model.eval()
