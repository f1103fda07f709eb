"""Per-rank memory of model + optimizer state on 1 vs 2 ranks, FSDP2 and DeepSpeed ZeRO-3.

    python bench/memory.py [--preset gpt2-124m] [--seq-len 128]

Each run builds the model (GPT-2 small: 124M parameters, ~85M in the blocks),
takes one bf16 training step on random tokens, so that Adam's moments exist,
and then counts every tensor alive in the rank's process, each storage once:
on a CPU the analogue of ``torch.cuda.memory_allocated`` after a step. That is
the resident state (parameters, master weights, Adam moments, gradient and
communication buffers), not the activation peak inside the step.
Prints one JSON object; the target is ``ratio`` <= 0.55 (two ranks each hold
at most 55% of what one rank holds).
"""
from __future__ import annotations

import argparse
import gc
import json

import torch

from ranks import build, random_batch, run_ranks, train_step, write_record

RUNS = [("none", []), ("fsdp", ["parallel.backend=fsdp"]),
        ("zero3", ["parallel.backend=deepspeed", "parallel.zero_stage=3"])]


def live_tensor_bytes() -> int:
    gc.collect()
    seen, total = set(), 0
    for obj in gc.get_objects():
        if not isinstance(obj, torch.Tensor) or obj.device.type == "meta":
            continue
        try:
            storage = obj.untyped_storage()
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError):  # wrapper tensors (DTensor): their local part counts
            continue
        if nbytes and ptr not in seen:
            seen.add(ptr)
            total += nbytes
    return total


def worker(out: str, model: list[str]) -> None:
    cfg, env, backend = build(model)
    train_step(backend, random_batch(cfg, env), cfg)
    write_record(out, env, {"bytes": live_tensor_bytes()})


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="gpt2-124m")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("extra", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    model = [f"model.preset={args.preset}", f"model.seq_len={args.seq_len}", "batch.global_size=2",
             "batch.micro_size=1", "parallel.precision=bf16"]
    if args.worker:
        return worker(args.worker, model + args.extra)
    gib, result = 2**30, {"preset": args.preset, "measure": "live tensor bytes per rank after one step"}
    for name, extra in RUNS:
        for world in (1, 2) if name != "none" else (1,):
            per_rank = [r["bytes"] / gib for r in run_ranks(__file__, world, ["--preset", args.preset,
                        "--seq-len", str(args.seq_len), *extra], threads=max(1, 2 // world))]
            result[f"{name}_world{world}_gib"] = [round(b, 3) for b in per_rank]
        if name != "none":
            result[f"{name}_ratio"] = round(max(result[f"{name}_world2_gib"]) / result[f"{name}_world1_gib"][0], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
