"""Peak host memory per rank of a one-step run, and init time, for 1, 2, 4 ... ranks.

    python bench/init.py [--preset gpt2-350m] [--runs none:1 fsdp:2 fsdp:4] [--whole] [--no-step]
                         [--set KEY=VALUE ...]

Each ``LAYOUT:WORLD`` run launches WORLD ranks (torchrun, gloo, fp32) that build the model
as the trainer does (on ``meta``, then ``build_backend``: each rank materialises only its
own shards, bigtrain/model/init.py) and take one training step on random tokens (the
trainer's recipe, ``bench/ranks.py``). Per rank it reports, in GiB:

- ``before``: resident set before building (Python, torch, bigtrain, the process group);
- ``model_peak``: the high-water mark once the weights are written, before the optimizer
  state exists (the model alone);
- ``build_peak``: the high-water mark once the backend and its AdamW state are built;
- ``step_peak``: the high-water mark during the step alone (the counter is reset after
  building, ``/proc/self/clear_refs``), and ``run_peak``, the larger of the two: the
  peak of the whole one-step run;
- ``step_s``: the step's wall seconds (forward, backward, clip and AdamW over the rank's rows);
- ``init_s``: seconds from constructing the model to the backend being ready (the draw of
  the initial weights dominates), and ``init_cpu_s``, the CPU seconds the rank spent on it
  (on a shared machine the wall time counts the other processes too).

Besides, ``draw_cpu_s`` gives per world size the CPU seconds each rank spends drawing its
rows of the initial weights (FSDP2's dim-0 chunks; measured in this process, one rank after
the other, so it does not depend on how busy a shared machine is): a rank computes only its
rows, but steps the generator past the rows before them, so later ranks take longer.

Figures are the maximum over ranks. ``run_peak_vs_one_process`` divides a run's
``run_peak`` by that of the first one-rank run in ``--runs`` (same script, same step, same
global batch). ``--whole`` adds the same runs with the model built whole on every rank
first (bigtrain before sharded init), for comparison. ``--set`` passes config overrides to
every run (e.g. ``parallel.vocab_table=gather``: the token table gathered by FSDP).

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
import re
import sys
import time

import torch

from bigtrain.config import load_config
from bigtrain.model.gpt import GPT
from bigtrain.model.init import seeded
from bigtrain.parallel.backend import build_backend
from bigtrain.parallel.env import init_distributed
from ranks import random_batch, run_ranks, train_step, write_record

LAYOUTS = {"none": [], "fsdp": ["parallel.backend=fsdp"],
           "zero3": ["parallel.backend=deepspeed", "parallel.zero_stage=3"],
           "zero2": ["parallel.backend=deepspeed", "parallel.zero_stage=2"]}
GIB = 2**30


def status_gib(key: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (its high-water mark) of this process, in GiB."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024 / GIB


def reset_peak() -> None:
    """Restart ``VmHWM`` from the current resident set (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def note_peak_before_optimizer(record: dict) -> None:
    """Wrap what each backend calls to create its optimizer state (``build_optimizer``; for
    DeepSpeed ``deepspeed.initialize``) so the high-water mark of building the model alone is
    noted first: AdamW's moments, created up front, would hide it."""
    import bigtrain.parallel.backend as local
    import bigtrain.parallel.fsdp as fsdp

    def noting(fn):
        def wrapped(*args, **kwargs):
            record.setdefault("model_peak", status_gib("VmHWM"))
            return fn(*args, **kwargs)
        return wrapped
    local.build_optimizer, fsdp.build_optimizer = noting(local.build_optimizer), noting(fsdp.build_optimizer)
    if "parallel.backend=deepspeed" in LAYOUTS.get(os.environ.get("BENCH_LAYOUT", ""), []):
        import deepspeed
        deepspeed.initialize = noting(deepspeed.initialize)


def draw_cpu_s(model: GPT, seed: int, world: int) -> list[float]:
    """CPU seconds each of ``world`` FSDP ranks spends on the seeded draw of its rows."""
    tensor_for, times = seeded(model, seed), []
    for rank in range(world):
        start = time.process_time()
        for name, param in model.named_parameters():
            rows = -(-param.shape[0] // world)  # FSDP2 shards dim 0 in chunks of ceil(n / world)
            tensor_for(name, param, slice(min(rank * rows, param.shape[0]), min((rank + 1) * rows, param.shape[0])))
        times.append(round(time.process_time() - start, 2))
    return times


def worker(out: str, mode: str, step: bool, overrides: list[str]) -> None:
    cfg = load_config(overrides=["parallel.device=cpu", "parallel.precision=fp32", *overrides])
    env = init_distributed("cpu", group=True)
    record = {"before": status_gib("VmRSS")}
    note_peak_before_optimizer(record)
    start, cpu = time.perf_counter(), time.process_time()
    torch.manual_seed(cfg.seed)
    if mode == "meta":
        with torch.device("meta"):
            model = GPT(cfg.model)
    else:
        model = GPT(cfg.model)
    backend = build_backend(model, cfg, env)
    record |= {"build_peak": status_gib("VmHWM"), "init_s": time.perf_counter() - start,
               "init_cpu_s": time.process_time() - cpu}
    if step:
        batch = random_batch(cfg, env)
        reset_peak()
        start = time.perf_counter()
        train_step(backend, batch, cfg)
        record["step_s"] = time.perf_counter() - start
        record["step_peak"] = status_gib("VmHWM")
        record["run_peak"] = max(record["build_peak"], record["step_peak"])
    write_record(out, env, record)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="gpt2-350m")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--runs", nargs="+", default=["none:1", "fsdp:2", "fsdp:4"], help="LAYOUT:WORLD")
    p.add_argument("--whole", action="store_true", help="also build the model whole on every rank first")
    p.add_argument("--no-step", action="store_true")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides for every run")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=["whole", "meta"], help=argparse.SUPPRESS)
    p.add_argument("extra", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    model = [f"model.preset={args.preset}", f"model.seq_len={args.seq_len}", "batch.global_size=4",
             "batch.micro_size=1", *args.set]
    if args.worker:
        return worker(args.worker, args.mode, not args.no_step, model + args.extra)
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(2**20))  # inherited by the ranks (run_ranks)
    cfg = load_config(overrides=model)
    with torch.device("meta"):
        shapes = GPT(cfg.model)
    result = {"preset": args.preset, "seq_len": args.seq_len, "global_batch": 4, "precision": "fp32", "set": args.set,
              "MALLOC_MMAP_THRESHOLD_": os.environ["MALLOC_MMAP_THRESHOLD_"],
              "params_M": round(shapes.num_params() / 1e6, 1),
              "largest_param_M": round(max(p.numel() for p in shapes.parameters()) / 1e6, 1),
              "fp32_model_gib": round(shapes.num_params() * 4 / GIB, 3),
              "unit": "GiB per rank (max over ranks); *_s in seconds"}
    baseline = {}
    for mode in ("meta", "whole") if args.whole else ("meta",):
        for run in args.runs:
            layout, world = run.split(":")
            os.environ["BENCH_LAYOUT"] = layout
            records = run_ranks(__file__, int(world), ["--mode", mode, "--preset", args.preset, "--seq-len",
                                str(args.seq_len), *(["--no-step"] if args.no_step else []), *LAYOUTS[layout], *args.set],
                                threads=max(1, 2 // int(world)))
            row = {key: round(max(r[key] for r in records), 1 if key.endswith("_s") else 3)
                   for key in records[0] if key != "rank"}
            if "run_peak" in row:
                if world == "1":
                    baseline.setdefault(mode, row["run_peak"])
                if mode in baseline:
                    row["run_peak_vs_one_process"] = round(row["run_peak"] / baseline[mode], 3)
            result[f"{layout}_world{world}" + ("_whole" if mode == "whole" else "")] = row
            print(json.dumps({run: row}), flush=True, file=sys.stderr)
    result["draw_cpu_s"] = {world: draw_cpu_s(shapes, cfg.seed, int(world))
                            for world in sorted({run.split(":")[1] for run in args.runs}, key=int)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
