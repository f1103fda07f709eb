"""What the EMA of the weights costs per step, for a ~100M-parameter GPT, next to a training step.

    python bench/ema.py [--steps 2] [--updates 10] [--data DIR] [--device auto|cpu|cuda]

Prints one JSON object: the median seconds of a training step (``Trainer.train_step``,
backend none, fp32 on CPU, bf16 on CUDA), of one EMA update (with a host bool and with a
0-d bool tensor on the device, as a device-side guard verdict arrives), and the cost per
step as a fraction of the step for ``ema.every`` 1 and 10. The update is three memory
passes over the fp32 weights (read EMA, read weights, write EMA): bandwidth, not FLOPs, so
its share shrinks as the batch (the FLOPs per step) grows; the step here uses a small batch.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bigtrain.config import load_config
from bigtrain.parallel.env import DistEnv
from bigtrain.trainer import Trainer
from common import prepared_data

MODEL = ["model.n_layer=14", "model.n_head=12", "model.d_model=768", "model.seq_len=256",
         "batch.global_size=8", "batch.micro_size=4", "logging.tensorboard=false", "logging.progress=off",
         "eval.batches=0", "checkpoint.every=0", "checkpoint.resume=never", "stability.enabled=false",
         "ema.decay=0.999"]


def median_s(fn, repeats: int, sync) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2, help="training steps timed (after one warm-up)")
    ap.add_argument("--updates", type=int, default=10, help="EMA updates timed (after one warm-up)")
    ap.add_argument("--data", default=None, help="a prepared data dir (default: tiny Shakespeare, bytes)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bigtrain-bench-"))
    data = prepared_data(args.data, tmp)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    precision = "bf16" if device.type == "cuda" else "fp32"
    cfg = load_config(overrides=[*MODEL, f"data.path={data}", f"run_dir={tmp / 'run'}",
                                 f"parallel.device={device.type}", f"parallel.precision={precision}"])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    trainer = Trainer(cfg, DistEnv(0, 1, 0, device))
    try:
        position = [0]

        def step():
            batch = trainer.loader.get(position[0], cfg.batch.global_size)
            trainer.train_step(batch)
            position[0] = batch.next_position

        step_s = median_s(step, args.steps, sync)
        applied = torch.ones((), dtype=torch.bool, device=device)
        host_s = median_s(lambda: trainer.ema.update(1, True), args.updates, sync)
        device_s = median_s(lambda: trainer.ema.update(1, applied), args.updates, sync)
        params = sum(p.numel() for p in trainer.model.parameters())
    finally:
        trainer.close()
    print(json.dumps({
        "device": device.type, "precision": precision, "params_M": round(params / 1e6, 1),
        "tokens_per_step": cfg.batch.global_size * cfg.model.seq_len,
        "step_s": step_s, "ema_update_s": host_s, "ema_update_device_verdict_s": device_s,
        "ema_GB_per_s": 3 * 4 * params / host_s / 1e9,
        "cost_per_step": {f"every={k}": max(host_s, device_s) / k / step_s for k in (1, 10)},
    }, indent=1))


if __name__ == "__main__":
    main()
