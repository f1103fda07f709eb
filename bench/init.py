"""Peak host memory per rank while building the model, whole vs sharded initialisation.

    python bench/init.py [--preset gpt2-350m] [--runs none:1 fsdp:2 zero3:2] [--no-step]

For each layout and world size it launches the ranks twice: ``whole`` builds the model
on every rank first and then hands it to the backend (bigtrain before sharded init);
``meta`` builds it on ``meta`` and lets the backend materialise only this rank's shards
(what the trainer does now, bigtrain/model/init.py). Per rank it reports the resident
set before building (imports, process group), the peak resident set once the backend
is built (``ru_maxrss``, the whole process's high-water mark), the peak reached before
the optimizer state is created (the model alone), the build time, and, unless
``--no-step``, the peak after one fp32 training step on random tokens. Prints one JSON
object; figures are the maximum over ranks, in GiB.

The ranks run with ``MALLOC_MMAP_THRESHOLD_=1048576`` unless the variable is set: glibc's
adaptive threshold otherwise serves the many per-parameter temporaries of a sharded build
from its heap and keeps the freed memory in the process, so RSS counts memory no tensor
holds (ZeRO-3 at 2 ranks: 2.0 GiB resident for 0.66 GiB of live tensors). A fixed
threshold returns every freed tensor above 1 MiB to the system, and RSS tracks what is alive.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import time

import torch

from bigtrain.config import load_config
from bigtrain.model.gpt import GPT
from bigtrain.parallel.backend import build_backend
from bigtrain.parallel.env import init_distributed
from ranks import random_batch, run_ranks, train_step, write_record

LAYOUTS = {"none": [], "fsdp": ["parallel.backend=fsdp"],
           "zero3": ["parallel.backend=deepspeed", "parallel.zero_stage=3"],
           "zero2": ["parallel.backend=deepspeed", "parallel.zero_stage=2"]}
GIB = 2**30


def rss_gib() -> float:
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kib * 1024 / GIB


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # KiB on Linux


def note_peak_before_optimizer(record: dict) -> None:
    """Wrap what each backend calls to create its optimizer state (``build_optimizer``; for
    DeepSpeed ``deepspeed.initialize``) so the high-water mark of building the model alone is
    noted first: AdamW's moments, created up front, are sharded either way and would hide it."""
    import deepspeed
    import bigtrain.parallel.backend as local
    import bigtrain.parallel.fsdp as fsdp

    def noting(fn):
        def wrapped(*args, **kwargs):
            record.setdefault("model_peak_gib", peak_gib())
            return fn(*args, **kwargs)
        return wrapped
    local.build_optimizer, fsdp.build_optimizer = noting(local.build_optimizer), noting(fsdp.build_optimizer)
    deepspeed.initialize = noting(deepspeed.initialize)


def worker(out: str, mode: str, step: bool, overrides: list[str]) -> None:
    cfg = load_config(overrides=["parallel.device=cpu", "parallel.precision=fp32", *overrides])
    env = init_distributed("cpu", group=True)
    record = {"before_gib": rss_gib()}
    note_peak_before_optimizer(record)
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    if mode == "meta":
        with torch.device("meta"):
            model = GPT(cfg.model)
    else:
        model = GPT(cfg.model)
    backend = build_backend(model, cfg, env)
    record |= {"build_peak_gib": peak_gib(), "build_s": time.perf_counter() - start}
    if step:
        train_step(backend, random_batch(cfg, env), cfg)
        record["step_peak_gib"] = peak_gib()
    write_record(out, env, record)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="gpt2-350m")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--runs", nargs="+", default=["none:1", "fsdp:2", "zero3:2"], help="LAYOUT:WORLD")
    p.add_argument("--no-step", action="store_true")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=["whole", "meta"], help=argparse.SUPPRESS)
    p.add_argument("extra", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    model = [f"model.preset={args.preset}", f"model.seq_len={args.seq_len}", "batch.global_size=4",
             "batch.micro_size=1"]
    if args.worker:
        return worker(args.worker, args.mode, not args.no_step, model + args.extra)
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(2**20))  # inherited by the ranks (run_ranks)
    with torch.device("meta"):
        shapes = GPT(load_config(overrides=model).model)
    result = {"preset": args.preset, "MALLOC_MMAP_THRESHOLD_": os.environ["MALLOC_MMAP_THRESHOLD_"],
              "params_M": round(shapes.num_params() / 1e6, 1),
              "largest_param_M": round(max(p.numel() for p in shapes.parameters()) / 1e6, 1),
              "fp32_model_gib": round(shapes.num_params() * 4 / GIB, 3), "unit": "GiB per rank (max over ranks)"}
    for run in args.runs:
        layout, world = run.split(":")
        for mode in ("whole", "meta"):
            records = run_ranks(__file__, int(world), ["--mode", mode, "--preset", args.preset, "--seq-len",
                                str(args.seq_len), *(["--no-step"] if args.no_step else []), *LAYOUTS[layout]],
                                threads=max(1, 2 // int(world)))
            result[f"{layout}_world{world}_{mode}"] = {
                key: round(max(r[key] for r in records), 3 if key != "build_s" else 1)
                for key in records[0] if key != "rank"}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
