"""``torch.distributed.checkpoint`` (DCP) reads and writes for the ``none`` and ``fsdp`` backends.

DCP writes each rank's shards of every tensor plus a ``.metadata`` index, and reads
them back resharded to whatever the loading ranks hold, which is what lets an FSDP
checkpoint written by 2 ranks load on 1 or on 8.

Why a wrapper: a checkpoint is a file a user may have been handed, and DCP's
stock reader unpickles ``.metadata`` with plain :mod:`pickle` and loads the
non-tensor items (the optimizer's hyper-parameters) with ``weights_only=False``;
either can run arbitrary code. Here ``.metadata`` goes through an unpickler that
only knows DCP's own index classes, and every non-tensor item must pass
``torch.load(weights_only=True)`` before DCP touches it. Tensors are read with
``weights_only=True`` by DCP itself.
"""
from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

# A one-process save or load is deliberate here (no_dist), not a fallback worth a warning.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

# What a DCP ``.metadata`` file may name: its own index classes, torch.Size, dtypes and paths.
_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
    "torch": {"Size"} | {name for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype)},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module == "torch.distributed.checkpoint.metadata" or name in _METADATA_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint's .metadata")


class SafeReader(FileSystemReader):
    """DCP's file reader with an allow-listed unpickler for ``.metadata``."""

    def read_metadata(self, *args, **kwargs):
        with open(Path(self.path) / ".metadata", "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """Refuses any non-tensor item that is not plain data (numbers, strings, containers)."""

    def load_bytes(self, read_item, value) -> None:
        torch.load(value, weights_only=True)  # raises on anything that would need code to rebuild
        value.seek(0)
        super().load_bytes(read_item, value)


def save(state: dict, path: Path, distributed: bool) -> None:
    """Write ``state`` (this rank's shards) into directory ``path``; a collective."""
    dcp.save(state, storage_writer=FileSystemWriter(str(path)), no_dist=not distributed)


def make_stager(device: torch.device) -> DefaultStager:
    """The CPU copy an async save writes from, made in a background thread (on a side
    stream, into pinned memory, on CUDA; :func:`async_save` orders it after the compute
    stream). Kept for the whole run: it reuses its buffers, so only the first async save
    pays for allocating them."""
    cuda = device.type == "cuda"
    return DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False,
                                        use_async_staging=True, use_non_blocking_copy=cuda))


def async_save(state: dict, path: Path, distributed: bool, group, stager: DefaultStager) -> AsyncSaveResponse:
    """Start copying ``state`` to CPU and writing it, both in background threads.

    ``staging_completion`` resolves when the copy is done: until then nothing may modify
    the tensors in ``state`` (the caller holds back the optimizer). ``upload_completion``
    resolves when every rank's shards and the ``.metadata`` are on disk. ``group`` must be
    a gloo group the training loop does not use: the writer thread runs collectives on it.
    """
    if torch.cuda.is_initialized():
        # DefaultStager copies on a stream of its own (made in make_stager), and that stream
        # does not wait for the compute stream: the copy could read parameters and Adam moments
        # while the kernels of the optimizer step that produced them are still queued, and save
        # a mix of two steps. Block until the compute stream has finished what it has queued;
        # the copy then reads finished values, and the optimizer hold (the caller's, until
        # staging_completion) keeps the next step from writing them before the copy is done.
        torch.cuda.current_stream().synchronize()
    return dcp.async_save(state, storage_writer=FileSystemWriter(str(path)), process_group=group,
                          async_stager=stager, no_dist=not distributed)


def load(state: dict, path: Path, distributed: bool) -> None:
    """Fill ``state`` in place from directory ``path``, resharding as needed; a collective."""
    dcp.load(state, storage_reader=SafeReader(str(path)), planner=SafeLoadPlanner(), no_dist=not distributed)


def holds(path: Path, entry: str) -> bool:
    """Whether the DCP checkpoint in ``path`` has an ``entry`` (a top-level key of the saved state)."""
    keys = SafeReader(str(path)).read_metadata().state_dict_metadata
    return any(key == entry or key.startswith(entry + ".") for key in keys)
