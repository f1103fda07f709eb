"""Per-step cost of the stability guard (detector + guard) against the step it guards,
on the smoke model and on a ~30M-parameter model, on this machine.

    python bench/stability.py [--steps 6] [--calls 2000] [--data DIR]

Prints one JSON object. The step is bigtrain's real ``train_step`` (bf16, as the
configs ship). The guard is timed on its own, with a full window (the default 128
steps, warm): ``judge`` (the OR-reduction of the non-finite flag, median and MAD of
both series) plus ``after_step`` on an ok step, which is what every normal step pays.
Timing the two runs of ``train_step`` with and without the guard would drown the
difference in run-to-run noise; the target is < 1% of the step.
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch

from bigtrain.config import load_config
from bigtrain.parallel.env import DistEnv
from bigtrain.trainer import Trainer
from common import MODELS, prepared_data

QUIET = ["logging.tensorboard=false", "logging.progress=off", "eval.batches=0", "checkpoint.every=0",
         "checkpoint.resume=never", "parallel.precision=bf16"]


def step_time(trainer: Trainer, steps: int) -> float:
    size, position = trainer.cfg.batch.global_size, 0
    times = []
    for i in range(steps + 2):  # two warm-up steps: allocator, kernels, AdamW state
        batch = trainer.loader.get(position, size)
        t0 = time.perf_counter()
        trainer.train_step(batch)
        times.append(time.perf_counter() - t0)
        position = batch.next_position
    return sorted(times[2:])[len(times[2:]) // 2]


def guard_time(trainer: Trainer, calls: int) -> float:
    guard, rng = trainer.guard, random.Random(0)
    batch = trainer.loader.get(0, trainer.cfg.batch.global_size)
    for _ in range(guard.cfg.window):  # fill the window: the steady state of a long run
        guard.judge(2.0 + rng.gauss(0, 0.01), 1.0 + rng.gauss(0, 0.01), False)
    t0 = time.perf_counter()
    for _ in range(calls):
        verdict = guard.judge(2.0 + rng.gauss(0, 0.01), 1.0 + rng.gauss(0, 0.01), False)
        guard.after_step(trainer, batch)
    assert verdict.apply
    return (time.perf_counter() - t0) / calls


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--data", default=None, help="a prepared data dir (default: tiny Shakespeare, bytes)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bigtrain-bench-"))
    data = prepared_data(args.data, tmp)
    out = {"threads": torch.get_num_threads(), "device": "cpu"}
    for name, model in MODELS.items():
        cfg = load_config(overrides=model + QUIET + [f"data.path={data}", f"run_dir={tmp / name}"])
        trainer = Trainer(cfg, DistEnv(0, 1, 0, torch.device("cpu")))
        try:
            step, guard = step_time(trainer, args.steps), guard_time(trainer, args.calls)
            out[name] = {"params_M": round(trainer.model.num_params() / 1e6, 2), "window": cfg.stability.window,
                         "step_ms": round(step * 1e3, 2), "guard_us": round(guard * 1e6, 1),
                         "guard_overhead_pct": round(100 * guard / step, 4)}
        finally:
            trainer.close()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
