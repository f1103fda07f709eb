"""What a checkpoint is on disk, and how to tell a loadable one from a bad one.

::

    RUN_DIR/checkpoints/step-00001200/
        .metadata, __<r>_<n>.distcp   model + optimizer shards (DCP; DeepSpeed writes its own files)
        meta.json                     format version, step, world size, backend, the resolved config
        state.pt                      {part name: state_dict()} of every other part: train state,
                                      data order (position, skip ledger, fingerprint), guard, ...
        rng-<rank>.pt                 each rank's RNG states (python, numpy, torch, cuda)
        manifest.json                 size and CRC-32 of every other file; written last

Only a directory named exactly ``step-<8+ digits>`` is a committed checkpoint. The
directory is written as ``step-00001200.tmp`` and renamed once every rank has
finished: the name without ``.tmp`` is the commit, and a ``.tmp`` is never loaded.
The other names a checkpoint directory passes through (see
:mod:`bigtrain.checkpoint.lifecycle`) are never loaded either: ``.old`` (a committed
checkpoint moved aside while the same step is committed again) and ``.deleting``
(on its way out: retention, or a timeline abandoned by a rollback).
The manifest catches what DCP would not: a missing or truncated shard, and flipped
bits (DCP reads raw byte ranges and would load garbage without a word). CRC-32,
not a cryptographic hash: it guards against accidents at ~4 GB/s, not against
an adversary, who is kept out by loading with ``weights_only=True`` instead.

Every check returns one line naming the checkpoint and the problem, which the
caller raises as :class:`~bigtrain.config.ConfigError` (exit status 2).
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import sys
import zlib
from pathlib import Path

import torch

from bigtrain.config import Config

FORMAT_VERSION = 3  # 3: attention's q, k, v apart (2 had a fused qkv); 2: one state.pt of named parts
MANIFEST, META, STATE = "manifest.json", "meta.json", "state.pt"
_COMMITTED = re.compile(r"^step-(\d{8,})$")

# The model fields that decide the weights' shapes or meaning. dropout, z_loss and
# init_std may change on resume: they shape training, not the function the weights compute.
ARCHITECTURE = ("n_layer", "n_head", "d_model", "ffn_dim", "seq_len", "vocab_size", "norm", "norm_eps",
                "mlp", "pos", "rope_theta", "bias", "tie_embeddings", "qk_norm")
# The plain-data classes DeepSpeed pickles into its checkpoint files (ZeRO-1/2/3, bf16 or fp32).
_DEEPSPEED_GLOBALS = ("deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.zero.config.ZeroStageEnum",
                      "deepspeed.utils.tensor_fragment.fragment_address")


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def tmp_dir(final: Path) -> Path:
    return final.with_name(final.name + ".tmp")


def aside_dir(final: Path) -> Path:
    return final.with_name(final.name + ".old")


def deleting_dir(final: Path) -> Path:
    return final.with_name(final.name + ".deleting")


def rng_file(rank: int) -> str:
    return f"rng-{rank:05d}.pt"


def committed(root: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of the committed checkpoints under ``root``, ascending by step."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _COMMITTED.match(p.name))]
    return sorted(found)


def leftovers(root: Path, suffix: str) -> list[Path]:
    """``step-*<suffix>`` directories under ``root``: what a crash left in the middle of a lifecycle step."""
    return sorted(Path(root).glob(f"step-*{suffix}")) if Path(root).is_dir() else []


def architecture(model_cfg) -> dict:
    return {k: getattr(model_cfg, k) for k in ARCHITECTURE}


# ---------------------------------------------------------------- writing

def write_synced(path: Path, data: bytes) -> None:
    """Write and fsync a file, so the commit never names bytes that are still in flight."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable (POSIX needs the directory synced too)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_files(directory: Path) -> None:
    """fsync every file under ``directory`` and the directories themselves.

    For writers that do not fsync on their own (DeepSpeed's ``torch.save`` calls):
    without it the commit could name shards whose bytes are still in the page cache,
    and a power loss would leave a committed checkpoint with holes."""
    d = Path(directory)
    for p in sorted(d.rglob("*")):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for sub in [d, *sorted(p for p in d.rglob("*") if p.is_dir())]:
        fsync_dir(sub)


def listing(directory: Path) -> list[str]:
    """Every file under ``directory`` but the manifest, as sorted relative paths."""
    d = Path(directory)
    return sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file() and p.name != MANIFEST)


def digest(path: Path) -> list[int]:
    """``[size, crc32]`` of one file."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            crc, size = zlib.crc32(chunk, crc), size + len(chunk)
    return [size, crc]


def write_manifest(directory: Path, digests: dict[str, list[int]]) -> None:
    body = {"format_version": FORMAT_VERSION, "files": dict(sorted(digests.items()))}
    write_synced(Path(directory) / MANIFEST, (json.dumps(body, indent=1) + "\n").encode())


# ---------------------------------------------------------------- reading and checking

@contextlib.contextmanager
def weights_only_loads():
    """Every ``torch.load`` inside is ``weights_only``, even where a library asks otherwise:
    DeepSpeed reads its own files with ``weights_only=False``. torch's documented switch
    ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` overrides that, and DeepSpeed's plain-data classes are
    allowed by name, so a checkpoint can hold tensors and data but never code."""
    allowed = []
    if "deepspeed" in sys.modules:
        for dotted in _DEEPSPEED_GLOBALS:
            module, name = dotted.rsplit(".", 1)
            allowed.append(getattr(importlib.import_module(module), name))
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(allowed):
            yield
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def read_meta(path: Path) -> dict:
    return json.loads((Path(path) / META).read_text())


_verified: dict[tuple[str, int], str | None] = {}  # (path, manifest mtime) -> problem found by the CRC pass


def problem(path: Path, cfg: Config | None = None, world: int | None = None, verify: bool = True,
            reader=None) -> str | None:
    """Why ``path`` cannot be loaded (by ``cfg`` on ``world`` ranks, through the backend ``reader``), or None.

    Cheap checks first (it is a checkpoint, its format, its files and sizes, the model and
    backend it was written for); then, when ``verify``, the CRC of every byte. The CRC
    pass is remembered per process, so the pre-flight check and the load read it once.
    """
    path = Path(path)
    where = f"checkpoint {str(path)!r}"
    for suffix, what in ((".tmp", "an unfinished write"), (".old", "a checkpoint replaced by a newer save"),
                         (".deleting", "being deleted")):
        if path.name.endswith(suffix):
            return f"{where} is {what} ({suffix}) and is never loaded"
    if not path.is_dir():
        return f"{where} does not exist" if not path.exists() else f"{where} is not a directory"
    if not (path / META).is_file():
        return f"{where} is not a bigtrain checkpoint (no {META})"
    try:
        meta = read_meta(path)
        version = int(meta["format_version"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{where}: {META} is unreadable ({type(e).__name__})"
    if version != FORMAT_VERSION:
        return (f"{where} has format version {version}; this bigtrain reads version {FORMAT_VERSION} "
                f"({'upgrade bigtrain' if version > FORMAT_VERSION else 'written by an older bigtrain'})")
    named, step = _COMMITTED.match(path.name), meta.get("step")
    if named and int(named.group(1)) != step:  # renamed: resuming would redo or skip steps
        return (f"{where} is named for step {int(named.group(1))} but its {META} says step {step} "
                "(renamed?); give it back its name or move it away")
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"{where}: {MANIFEST} is missing or unreadable ({type(e).__name__}); it was never committed"
    for name, (size, _) in files.items():
        if not (path / name).is_file():
            return f"{where}: file {name} is missing"
        if (path / name).stat().st_size != size:
            return f"{where}: file {name} has {(path / name).stat().st_size} bytes, the manifest says {size}"
    if cfg is not None:
        mismatch = config_mismatch(meta, cfg, world, reader)
        if mismatch:
            return f"{where} {mismatch}"
    if verify:
        key = (str(path.resolve()), (path / MANIFEST).stat().st_mtime_ns)
        if key not in _verified:
            bad = [name for name, expected in files.items() if digest(path / name) != expected]
            _verified[key] = f"{where}: file {bad[0]} is corrupted (CRC-32 mismatch)" if bad else None
        return _verified[key]
    return None


def config_mismatch(meta: dict, cfg: Config, world: int | None, reader=None) -> str | None:
    """How the checkpoint's model, format or world size rules out loading it here, or None.
    ``reader``: the backend (class) that would load it; its declared capabilities
    (``checkpoint_format``, ``reshards_checkpoints``) decide, never its name."""
    from bigtrain.config import ModelConfig
    try:
        theirs = architecture(ModelConfig.model_validate(meta["config"]["model"]))
    except Exception as e:  # noqa: BLE001 - any malformed config is the same user-facing problem
        return f"has an unreadable model config ({type(e).__name__})"
    ours = architecture(cfg.model)
    for key in ARCHITECTURE:
        if theirs[key] != ours[key]:
            return (f"was written for a different model: model.{key}={theirs[key]!r} there, "
                    f"{ours[key]!r} in this config")
    if reader is None:
        return None
    if meta.get("checkpoint_format") != reader.checkpoint_format:
        return (f"holds {meta.get('checkpoint_format')} shards (written by the {meta.get('backend')} backend); "
                f"parallel.backend={cfg.parallel.backend} reads {reader.checkpoint_format} "
                f"(use `bigtrain export` to carry the weights across)")
    if not reader.reshards_checkpoints and world is not None and meta.get("world_size") != world:
        return (f"holds {reader.checkpoint_format} shards for {meta.get('world_size')} ranks, which "
                f"parallel.backend={cfg.parallel.backend} reloads only at that world size, not {world}")
    return None
