"""What the detail metrics cost: a plain step, a detail step, and what a non-detail step
pays for the hooks being possible, on the smoke model and a ~30M-parameter model.

    python bench/health.py [--steps 6] [--data DIR]

Prints one JSON object. Steps are bigtrain's real ``train_step`` (bf16) wrapped in
``Health.before_step`` / ``after_step`` exactly as ``Trainer.fit`` does; detail steps
write TensorBoard histograms (``logging.tensorboard=true``), the expensive part.
Also times ``bigtrain preflight`` (in-process, default settings) on the smoke model.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from bigtrain.config import load_config
from bigtrain.parallel.env import DistEnv
from bigtrain.preflight import run_preflight
from bigtrain.trainer import Trainer
from common import MODELS, prepared_data

QUIET = ["logging.progress=off", "eval.batches=0", "checkpoint.every=0", "checkpoint.resume=never",
         "parallel.precision=bf16", "logging.tensorboard=true"]


def step_times(trainer: Trainer, steps: int) -> tuple[float, float]:
    """Median seconds of ``before_step + train_step + after_step`` on plain and on detail
    steps, interleaved so that load from other processes hits both alike."""
    size, position, every = trainer.cfg.batch.global_size, 0, trainer.health.every
    times: dict[bool, list[float]] = {False: [], True: []}
    for i in range(steps + 2):  # two warm-up rounds: allocator, kernels, AdamW state
        for detail in (False, True):
            step = (i + 1) * every if detail else i * every + 1
            batch = trainer.loader.get(position, size)
            t0 = time.perf_counter()
            trainer.health.before_step(step)
            result = trainer.train_step(batch)
            trainer.health.after_step(step, batch, result)
            times[detail].append(time.perf_counter() - t0)
            position = batch.next_position
    plain, detail = (sorted(times[d][2:])[len(times[d][2:]) // 2] for d in (False, True))
    return plain, detail


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--data", help="a prepared dir (default: tiny Shakespeare, bytes)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-health-"))
    data = prepared_data(args.data, tmp)
    env = DistEnv(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    out = {"device": "cpu", "threads": torch.get_num_threads(), "models": {}}
    for name, model in MODELS.items():
        cfg = load_config(overrides=[f"data.path={data}", f"run_dir={tmp / name}", "logging.detail_every=1000",
                                     *QUIET, *model])
        trainer = Trainer(cfg, env)
        try:
            plain, detail = step_times(trainer, args.steps)
            calls = 10000
            t0 = time.perf_counter()
            for i in range(calls):  # what a non-detail step pays: two calls that return at once
                trainer.health.before_step(2 * i + 1)
                trainer.health.after_step(2 * i + 1, None, {"verdict": "ok"})
            idle = (time.perf_counter() - t0) / calls
        finally:
            trainer.close()
        out["models"][name] = {"params_M": round(trainer.model.num_params() / 1e6, 2),
                               "step_ms": round(plain * 1e3, 1), "detail_step_ms": round(detail * 1e3, 1),
                               "detail_overhead": round(detail / plain - 1, 3),
                               "non_detail_cost_us": round(idle * 1e6, 2),
                               "non_detail_fraction": idle / plain}
    cfg = load_config("configs/smoke.yaml", overrides=[f"data.path={data}", f"run_dir={tmp / 'pf'}"])
    t0 = time.perf_counter()
    report = run_preflight(cfg, lr_range=True)
    out["preflight_smoke_s"] = round(time.perf_counter() - t0, 1)
    out["preflight_passed"] = report.passed
    print(json.dumps(out))


if __name__ == "__main__":
    main()
