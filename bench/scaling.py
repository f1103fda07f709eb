"""Training tokens/s on 1 vs 2 ranks for each backend, the same global batch.

    python bench/scaling.py [--steps 6] [--threads 2]

A ~30M GPT (8 x 512, seq 256, byte vocabulary), global batch 16 in micro-batches
of 8, bf16, random tokens in memory. One rank gets all ``--threads`` CPU
threads; two ranks get half each, so on a CPU the comparison is the cost of
splitting the same cores into ranks (communication and sharding overhead), and
``efficiency`` = tokens/s on 2 ranks / tokens/s on 1 rank is 1.0 when that cost
is nil. On GPUs, where each rank brings its own device, multiply by the ranks.
Each figure is the median of ``--steps`` timed steps (after two warm-up steps): the
fastest step would flatter a noisy backend, the mean lets one interrupted step decide.
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

from ranks import build, random_batch, run_ranks, train_step, write_record

MODEL = ["model.n_layer=8", "model.n_head=8", "model.d_model=512", "model.seq_len=256", "model.vocab_size=257",
         "batch.global_size=16", "batch.micro_size=8", "parallel.precision=bf16"]
RUNS = [("none", ["parallel.backend=none"]), ("fsdp", ["parallel.backend=fsdp"]),
        ("zero2", ["parallel.backend=deepspeed", "parallel.zero_stage=2"]),
        ("zero3", ["parallel.backend=deepspeed", "parallel.zero_stage=3"])]


def worker(out: str, steps: int, extra: list[str]) -> None:
    cfg, env, backend = build(MODEL + extra)
    batch = random_batch(cfg, env)
    for _ in range(2):  # warm-up: allocator, kernels, Adam state
        train_step(backend, batch, cfg)
    seconds = []
    for _ in range(steps):
        env.barrier()
        t0 = time.perf_counter()
        train_step(backend, batch, cfg)
        env.barrier()
        seconds.append(time.perf_counter() - t0)
    write_record(out, env, {"tokens_per_s": cfg.batch.global_size * cfg.model.seq_len / statistics.median(seconds)})


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=2, help="CPU threads shared by the ranks")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("extra", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker, args.steps, args.extra)
    result = {"model": "8x512, seq 256, global batch 16, bf16", "threads": args.threads}
    for name, extra in RUNS:
        for world in (1, 2):
            (rank0, *_) = run_ranks(__file__, world, ["--steps", str(args.steps), *extra],
                                    threads=max(1, args.threads // world))
            result[f"{name}_world{world}_tokens_per_s"] = round(rank0["tokens_per_s"])
        result[f"{name}_efficiency"] = round(result[f"{name}_world2_tokens_per_s"]
                                             / result[f"{name}_world1_tokens_per_s"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
