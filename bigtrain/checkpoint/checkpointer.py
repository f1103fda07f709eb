"""The Checkpointer: save and restore a named set of stateful parts, with an atomic commit.

It never sees the trainer. A checkpoint is a dict of *parts*: ``parts["model"]``
is the backend, which writes and reads its own model and optimizer shards
(``save_sharded`` / ``async_save_sharded`` / ``load_sharded``: DCP for none and
fsdp, DeepSpeed's own format for deepspeed); every other part is an object with
``state_dict()`` / ``load_state_dict()`` over plain data (the train state, the data
order with its skip ledger, the stability guard, ...), written by rank 0 into one
file. Each rank's RNG states are saved and restored here, so a resumed run draws
the same dropout masks. Adding a stateful part touches only the code that builds
the dict.

The commit protocol, the same for sync and async saves:

1. rank 0 makes ``step-XXXXXXXX.tmp``; every rank writes its own small files, then
   its shards;
2. once a rank's shards are on disk it waits for the others (a barrier); one process
   per node fsyncs every file (DCP fsyncs its own, DeepSpeed does not), then each rank
   checksums its share of the files, and the checksums go to rank 0;
3. rank 0 writes ``manifest.json``, fsyncs, renames the directory to
   ``step-XXXXXXXX`` (the commit; see :mod:`bigtrain.checkpoint.lifecycle` for a step
   committed again), and retires all but the ``checkpoint.keep`` newest, never the
   one pinned with :meth:`Checkpointer.protect`.

A crash anywhere before the rename leaves a ``.tmp`` that is never loaded and is
deleted when the next run starts. With ``checkpoint.async: true`` step 1 returns
once the shards are copied to CPU, and steps 2-3 run in a background thread
(DCP's ``async_save`` with its collectives on a gloo group of their own); the
next save, a load and the end of training wait for it.

Every collective here runs on every rank in the same order: rank 0 decides
(which checkpoint to resume, whether it is sound, what to delete) and broadcasts
the decision.
"""
from __future__ import annotations

import io
import json
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from bigtrain.checkpoint import lifecycle
from bigtrain.checkpoint.format import (FORMAT_VERSION, META, STATE, committed, digest, fsync_files, listing,
                                        problem, read_meta, rng_file, step_dir, tmp_dir, weights_only_loads,
                                        write_manifest, write_synced)
from bigtrain.checkpoint.resume import select
from bigtrain.config import Config, ConfigError
from bigtrain.parallel.env import DistEnv, rng_state, set_rng_state

MODEL = "model"  # the part that is the backend; the others are state_dict() objects


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


def _fresh_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


def _os_error(error: BaseException | None) -> OSError | None:
    """The OSError behind ``error`` (itself, its cause, or the first failed rank's in DCP's
    ``CheckpointException``), or None when it is not a failed write."""
    if error is None or isinstance(error, OSError):
        return error
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict):
        for rank in sorted(failures):
            failure = failures[rank]
            if found := _os_error(failure[0] if isinstance(failure, tuple) else failure):
                return found
    return _os_error(error.__cause__ or error.__context__)


@dataclass(frozen=True)
class _Failed:
    """An OSError on rank 0, sent to every rank."""
    what: str
    error: OSError


@dataclass(frozen=True)
class Resumed:
    """What :meth:`Checkpointer.resume` loaded, for the run's log and ledger."""
    path: Path
    step: int
    passed_over: list[str]  # why newer checkpoints were not used (checkpoint.fallback)


class Checkpointer:
    def __init__(self, cfg: Config, env: DistEnv, log: Callable[[str], None] = print,
                 before_commit: Callable[[int], None] | None = None):
        """``log(line)`` gets a line for the run's log (called on rank 0 only).
        ``before_commit(step)`` runs on every rank once its shards are on disk, before
        the commit: the hook of ``faults.crash_in_checkpoint_at``."""
        self.cfg, self.env, self.log, self.before_commit = cfg, env, log, before_commit
        self.root = Path(cfg.run_dir) / "checkpoints"
        # DeepSpeed writes through its own engine, which has no async path here.
        # Checkpoint collectives get a gloo group of their own, so a writer thread never
        # shares a communicator with the training loop.
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self.stager = None
        self.pending: threading.Thread | None = None
        self.hold = None  # the optimizer pre-step hook that waits for an async save's CPU copy
        self.blocked_s = 0.0  # time the training loop has waited on checkpoints: in save() and held updates
        self.error: BaseException | None = None
        self.last_step: int | None = None  # the step this process saved last (a second save of it is a no-op)
        self.protected: int | None = None

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

    def _on_main(self, action, what: str):
        """Run a directory operation on rank 0 and give every rank its result; an
        OSError there is raised on every rank, so no rank goes on alone."""
        result = None
        if self.env.is_main:
            try:
                result = action()
            except OSError as e:
                result = _Failed(what, e)
        result = self._broadcast(result)
        if isinstance(result, _Failed):
            raise OSError(result.error.errno, f"{result.what} failed: {result.error.strerror}", result.error.filename)
        return result

    def _on_all(self, action):
        """Run ``action`` on every rank; if it raises an OSError on any, every rank raises
        the lowest failing rank's, so that none goes on into the next collective alone."""
        try:
            result, error = action(), None
        except OSError as e:
            result, error = None, e
        if self.env.distributed:
            errors: list = [None] * self.env.world
            dist.all_gather_object(errors, error, group=self.group)
            error = next((e for e in errors if e is not None), None)
        if error is not None:
            raise error
        return result

    def _say(self, line: str) -> None:
        if self.env.is_main:
            self.log(line)

    # ------------------------------------------------------------------ lifecycle
    def committed(self) -> list[tuple[int, Path]]:
        """Committed checkpoints, ascending by step (after any pending commit; the same on every rank)."""
        self.wait()
        return committed(self.root)

    def protect(self, step: int | None) -> None:
        """Retention never deletes committed step ``step`` (None: nothing pinned), whatever
        ``checkpoint.keep`` says: the rollback target of an episode in progress."""
        self.protected = step

    def abandon_after(self, step: int) -> list[int]:
        """Durably delete every committed checkpoint newer than ``step`` (a rollback's dead
        timeline), so that no crash can resume from it. Every rank calls it; returns the steps."""
        self.wait()  # a pending commit of a newer step must land first, or it would survive
        gone = self._on_main(lambda: lifecycle.abandon(self.root, step), f"abandoning steps after {step}")
        if self.last_step is not None and self.last_step > step:
            self.last_step = None
        if gone:
            self._say(f"checkpoint: deleted steps {gone}, newer than step {step} (abandoned timeline)")
        return gone

    # ------------------------------------------------------------------ saving
    def save(self, step: int, parts: dict) -> Path:
        """Commit ``step-XXXXXXXX`` holding ``parts``; a no-op if this process already saved ``step``.
        Saving a step that is already committed replaces it atomically. A write that fails (a full
        disk, a read-only file system) is a :class:`ConfigError` naming the step and the reason, on
        every rank, once the partial ``.tmp`` is removed; the committed checkpoints stay as they were."""
        final = step_dir(self.root, step)
        if step == self.last_step:
            return final
        t0 = time.perf_counter()
        self.wait()
        tmp = tmp_dir(final)
        try:
            self._on_main(lambda: _fresh_dir(tmp), f"creating {tmp}")
            self._on_all(lambda: self._write_own_files(step, parts, tmp))
            self._save_shards(step, parts, tmp, final)
        except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
            raise self._failure(e, final) from None
        self.last_step = step
        self.blocked_s += time.perf_counter() - t0
        return final

    def _failure(self, error: BaseException, final: Path) -> BaseException:
        """What a failed save raises: for a failed write, a one-line :class:`ConfigError` once
        rank 0 removed the partial ``.tmp``; anything else as it was."""
        cause = _os_error(error)
        if cause is None:
            return error
        if self.env.is_main:
            shutil.rmtree(tmp_dir(final), ignore_errors=True)
        last = committed(self.root)
        kept = f"step {last[-1][0]} is the last committed checkpoint" if last else "no checkpoint was committed"
        reason = cause.strerror or str(cause)
        return ConfigError(f"checkpoint {final.name}: {reason[:1].lower() + reason[1:]} "
                           f"({cause.filename or final.parent}); removed the partial write, {kept}")

    def _save_shards(self, step: int, parts: dict, tmp: Path, final: Path) -> None:
        backend = parts[MODEL]
        if self.cfg.checkpoint.async_save and backend.async_checkpoint:  # else (DeepSpeed) a sync save
            if self.stager is None:
                from bigtrain.checkpoint.dcp_io import make_stager
                self.stager = make_stager(self.env.device)
            response = backend.async_save_sharded(tmp, self.group, self.stager)
            # The copy to CPU overlaps the next forward and backward; only the update, which
            # would change what is being copied, waits for it.
            staged = response.staging_completion
            self.hold = backend.optimizer.register_step_pre_hook(lambda *_: self._held(staged))
            self.pending = threading.Thread(target=self._commit_in_background, name="checkpoint-commit",
                                            args=(response.upload_completion.result, step, tmp, final),
                                            daemon=True)
            self.pending.start()
        else:
            backend.save_sharded(tmp)
            self._commit(lambda: None, step, tmp, final)

    def _held(self, staged) -> None:
        t0 = time.perf_counter()
        staged.result()
        self.blocked_s += time.perf_counter() - t0

    def _write_own_files(self, step: int, parts: dict, tmp: Path) -> None:
        """The small files, written now (even when the shards go async) so they hold this step."""
        if self.env.is_main:
            meta = {"format_version": FORMAT_VERSION, "step": step, "world_size": self.env.world,
                    "backend": self.cfg.parallel.backend, "checkpoint_format": parts[MODEL].checkpoint_format,
                    "time": time.time(), "config": self.cfg.to_dict()}
            write_synced(tmp / META, (json.dumps(meta, indent=1) + "\n").encode())
            state = {name: part.state_dict() for name, part in parts.items() if name != MODEL}
            write_synced(tmp / STATE, _to_bytes(state))
        write_synced(tmp / rng_file(self.env.rank), _to_bytes(_portable_rng(rng_state())))

    def _commit(self, written, step: int, tmp: Path, final: Path) -> None:
        written()                     # this rank's shards are on disk
        if self.before_commit is not None:
            self.before_commit(step)  # faults.crash_in_checkpoint_at: kill -9 right here
        self._barrier()               # ... and every rank's

        def checksums() -> dict:
            if self.env.local_rank == 0:  # once per node: that node's page cache, whoever wrote it
                fsync_files(tmp)
            return {n: digest(tmp / n) for n in listing(tmp)[self.env.rank::self.env.world]}

        digests = self._merge(self._on_all(checksums))

        def commit_and_retire() -> list[int]:
            write_manifest(tmp, digests)
            lifecycle.commit(tmp, final)
            return lifecycle.retire(self.root, self.cfg.checkpoint.keep, self.protected)

        self._on_main(commit_and_retire, f"committing {final}")
        self._say(f"checkpoint: saved {final}")

    def _commit_in_background(self, written, step: int, tmp: Path, final: Path) -> None:
        try:
            self._commit(written, step, tmp, final)
        except BaseException as e:  # noqa: BLE001 - re-raised on the training thread by wait()
            self.error = self._failure(e, final)

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
    def load(self, path: Path, parts: dict) -> None:
        """Restore every part and this rank's RNG from ``path``.

        Rank 0 checks the checkpoint (reading every byte once per process) and tells the
        others. The plain-data parts load first: a part that refuses its state (the data
        order, when the data changed) stops the load before the shards are read.
        """
        self.wait()
        path = Path(path)
        why = problem(path, self.cfg, self.env.world, True, type(parts[MODEL])) if self.env.is_main else None
        why = self._broadcast(why)
        if why:
            raise ConfigError(why)
        states = torch.load(path / STATE, weights_only=True)
        for name, part in parts.items():
            if name == MODEL:
                continue
            if name not in states:
                raise ConfigError(f"checkpoint {str(path)!r} holds no state for {name!r} "
                                  f"(it has: {', '.join(sorted(states))})")
            try:
                part.load_state_dict(states[name])
            except ConfigError as e:
                raise ConfigError(f"checkpoint {str(path)!r}: {e}") from None
        with weights_only_loads():
            parts[MODEL].load_sharded(path)
        own_rng = path / rng_file(self.env.rank)
        if own_rng.is_file():
            set_rng_state(_native_rng(torch.load(own_rng, weights_only=True)))
        saved_world = read_meta(path)["world_size"]
        if saved_world != self.env.world:
            self._say(f"checkpoint: written by {saved_world} ranks, loaded on {self.env.world}; "
                      "ranks without a saved RNG state keep their seeded one")
        self.last_step = None  # the state may differ from what this process saved at that step

    def resume(self, parts: dict) -> Resumed | None:
        """Per ``checkpoint.resume``: load the chosen checkpoint into ``parts``, or None if
        there is none. First undoes what a crash left half done (see :func:`lifecycle.recover`)."""
        for line in self._on_main(lambda: lifecycle.recover(self.root), "cleaning up"):
            self._say(f"checkpoint: {line}")
        choice = None
        if self.env.is_main:
            try:
                choice = select(self.cfg, self.env.world, reader=type(parts[MODEL]))
            except ConfigError as e:
                choice = str(e)
        choice = self._broadcast(choice)
        if isinstance(choice, str):
            raise ConfigError(choice)
        path, passed = choice
        for why in passed:
            self._say(f"checkpoint: {why}; falling back to an older one (checkpoint.fallback)")
        if path is None:
            return None
        self.load(path, parts)
        step = int(read_meta(path)["step"])
        self._say(f"checkpoint: resumed from {path} at step {step}")
        return Resumed(path, step, passed)
