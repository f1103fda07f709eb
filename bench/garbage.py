"""Plant real bad data in a prepared corpus, for the guard's benchmarks.

``faults.spike_at`` corrupts a batch in memory; a benchmark of the guard should meet
bad *data* the way a real run does: on disk, read by the loader, met again after a
resume, left behind only by a skip. :func:`plant` copies a prepared directory and
writes random tokens over some of the samples that chosen steps read (found with the
run's own :class:`~bigtrain.data.order.SampleOrder`, as ``bigtrain inspect`` would),
then fixes the manifest's sha256 so the copy still opens as a sound corpus.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from bigtrain.config import Config
from bigtrain.data.dataset import open_data
from bigtrain.data.order import SampleOrder
from bigtrain.faults import nominal_windows


def _train_token_range(cfg: Config, data) -> tuple[int, int]:
    """[start, end) of the train tokens in the train shards' concatenation (as the trainer cuts them)."""
    train = data.split("train")
    has_val = cfg.data.val_path or (data.has_split("val") and data.split("val").num_samples(cfg.model.seq_len) > 0)
    if not has_val and cfg.data.val_fraction > 0:
        train, _ = train.tail(cfg.data.val_fraction)
    return train.start, train.end


def plant(src: str | Path, dst: str | Path, cfg: Config, steps: list[int], fraction: float = 1.0,
          seed: int = 0) -> dict:
    """Copy ``src`` to ``dst`` with random tokens over a ``fraction`` of the samples each of
    ``steps`` (1-based, in a run of ``cfg`` without skips) reads. Returns the stream positions
    and sample indices planted, per step."""
    src, dst = Path(src), Path(dst)
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    data = open_data(str(dst), verify=False)
    seq = cfg.model.seq_len
    start, end = _train_token_range(cfg, data)
    order = SampleOrder((end - start) // (seq + 1), cfg.seed)
    rng = np.random.default_rng(seed)
    manifest = json.loads((dst / "manifest.json").read_text())
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    shards = [s for s in manifest["splits"]["train"]["shards"] if int(s["tokens"]) > 0]
    offsets = np.concatenate([[0], np.cumsum([int(s["tokens"]) for s in shards])])
    maps = [np.memmap(dst / s["file"], dtype=dtype, mode="r+") for s in shards]
    planted = {}
    for step, (a, b) in zip(sorted(steps), nominal_windows(sorted(steps), cfg)):
        positions = np.arange(a, b)
        chosen = np.sort(rng.choice(positions, size=max(1, round(fraction * len(positions))), replace=False))
        samples = order.sample_at(chosen)
        for sample in samples:
            lo = start + int(sample) * (seq + 1)
            garbage = rng.integers(0, data.vocab_size, size=seq + 1)
            for k in range(len(maps)):  # a sample may cross a shard boundary
                s_lo, s_hi = max(lo, offsets[k]), min(lo + seq + 1, offsets[k + 1])
                if s_lo < s_hi:
                    maps[k][s_lo - offsets[k]:s_hi - offsets[k]] = garbage[s_lo - lo:s_hi - lo]
        planted[step] = {"positions": chosen.tolist(), "samples": samples.tolist()}
    for shard, mm in zip(shards, maps):
        mm.flush()
        shard["sha256"] = hashlib.sha256((dst / shard["file"]).read_bytes()).hexdigest()
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return planted
