"""Checkpoint save and load of a ~100M-parameter GPT (model + AdamW state), one process.

    python bench/checkpoint.py [--data DIR] [--dir DIR]

Prints one JSON object: checkpoint size; sync save time and MB/s (the median of three
saves after a cold first one, reported apart); async save: how
long the training loop is blocked (inside ``Checkpointer.save``, plus the next
update waiting for the CPU copy, which overlaps that step's forward and backward)
and how long until the commit, for the first save (buffers allocated) and a later
one (buffers reused); load time and MB/s; the CRC pass alone. The async save blocks
the loop for ``async_blocked_vs_sync`` of a sync save (target: at most 0.10).
Training steps run while the write proceeds, as in a real run; on a CPU-only
machine the writer threads share the cores with them, so those steps are slower
(``steps_meanwhile_s`` against ``train_step_s``).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bigtrain.checkpoint.format import problem
from bigtrain.config import load_config
from bigtrain.parallel.env import DistEnv
from bigtrain.trainer import Trainer
from common import prepared_data

# 12 x 832 with a byte vocabulary: 99.8M parameters, nearly all in the blocks.
MODEL = ["model.n_layer=12", "model.n_head=13", "model.d_model=832", "model.seq_len=64",
         "batch.global_size=1", "batch.micro_size=1", "parallel.precision=fp32", "logging.tensorboard=false",
         "logging.progress=off", "eval.batches=0", "checkpoint.resume=never", "checkpoint.keep=10",
         "stability.enabled=false", "data.prefetch=0"]


def step(trainer: Trainer) -> float:
    """One training step and the bookkeeping the loop does after it; returns its seconds."""
    t0 = time.perf_counter()
    batch = trainer.loader.get(trainer.state.position, 1)
    trainer.train_step(batch)
    trainer.state.step += 1
    trainer.state.position, trainer.state.samples = batch.next_position, trainer.state.samples + 1
    return time.perf_counter() - t0


def size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def async_save(trainer: Trainer) -> dict:
    """The loop is blocked inside save() and, in the next step, while its update waits for
    the CPU copy (``Checkpointer.blocked_s`` counts both)."""
    ckpt = trainer.checkpointer
    step(trainer)
    before, t0 = ckpt.blocked_s, time.perf_counter()
    ckpt.save(trainer.state.step, trainer.parts())
    in_save = time.perf_counter() - t0
    steps = [step(trainer)]
    while ckpt.pending.is_alive():
        steps.append(step(trainer))
    until_commit = time.perf_counter() - t0
    ckpt.wait()
    return {"blocked_s": round(ckpt.blocked_s - before, 3), "in_save_s": round(in_save, 3),
            "until_commit_s": round(until_commit, 3), "steps_meanwhile_s": [round(x, 2) for x in steps]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", help="a prepared data dir (default: tiny Shakespeare or stdlib, bytes)")
    ap.add_argument("--dir", help="where to write checkpoints (default: a temp dir, removed after)")
    args = ap.parse_args()
    tmp = Path(args.dir or tempfile.mkdtemp(prefix="bigtrain-bench-ckpt-"))
    data = prepared_data(args.data, tmp)
    cpu = DistEnv(0, 1, 0, torch.device("cpu"))
    cfg = load_config(overrides=MODEL + [f"data.path={data}", f"run_dir={tmp / 'run'}"])
    trainer = Trainer(cfg, cpu)
    try:
        step(trainer)  # warm-up; AdamW state exists from here on
        step_s = statistics.median(step(trainer) for _ in range(5))

        sync = []  # the first save is cold (files created, pages faulted): report it apart from the median
        for _ in range(4):
            step(trainer)
            t0 = time.perf_counter()
            path = trainer.checkpointer.save(trainer.state.step, trainer.parts())
            sync.append(time.perf_counter() - t0)
        sync_s = statistics.median(sync[1:])
        mb = size_mb(path)

        trainer.cfg.checkpoint.async_save = True  # the checkpointer reads it at every save
        first, steady = async_save(trainer), async_save(trainer)
        newest = trainer.checkpointer.committed()[-1][1]
    finally:
        trainer.close()

    t0 = time.perf_counter()
    problem(path, cfg, 1, verify=True)
    crc_s = time.perf_counter() - t0
    fresh = Trainer(load_config(overrides=MODEL + [f"data.path={data}", f"run_dir={tmp / 'load'}"]), cpu)
    try:
        t0 = time.perf_counter()
        fresh.checkpointer.load(newest, fresh.parts())  # includes the CRC pass over every byte
        load_s = time.perf_counter() - t0
    finally:
        fresh.close()

    out = {
        "params_M": round(trainer.model.num_params() / 1e6, 2), "checkpoint_MB": round(mb, 1),
        "threads": torch.get_num_threads(), "train_step_s": round(step_s, 3),
        "sync_save": {"median_s": round(sync_s, 3), "MB_per_s": round(mb / sync_s, 1), "first_s": round(sync[0], 3)},
        "async_save_first": first, "async_save_steady": steady,
        "async_blocked_vs_sync": round(steady["blocked_s"] / sync_s, 4),
        "load": {"s": round(load_s, 3), "MB_per_s": round(mb / load_s, 1)},
        "crc_verify": {"s": round(crc_s, 3), "MB_per_s": round(mb / crc_s, 1)},
        "dir": str(tmp),
    }
    print(json.dumps(out, indent=2))
    if not args.dir:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
