"""Per-rank state memory, measured against ``bigtrain plan``'s prediction, on 1, 2 and 4 ranks.

    python bench/memory.py [--sizes small,gpt2-124m,gpt2-350m] [--seq-len 128] [--runs none,fsdp,zero2,zero3,fsdp-tp2]

Each run builds the model, takes one bf16 training step on random tokens (so Adam's
moments exist), runs the next step's forward and backward, and then counts every tensor
alive in the rank's process, each storage once: on a CPU the analogue of
``torch.cuda.memory_allocated`` at the state's peak (parameters, master weights, Adam
moments, gradients, communication buffers; the activations are freed by then). The
prediction is ``bigtrain.plan.state_bytes`` for the same config, data-parallel size and
tensor-parallel degree; the target is ``error`` within 15%. The layouts: no sharding, FSDP,
ZeRO-2 and ZeRO-3 on 1 and 2 ranks, and FSDP with tensor parallelism (``parallel.tp=2``) at
(dp 1, tp 2) and (dp 2, tp 2). Prints one JSON object.
"""
from __future__ import annotations

import argparse
import gc
import json

import torch

from bigtrain.plan import state_bytes
from ranks import build, random_batch, run_ranks, train_step, write_record

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
    batch = random_batch(cfg, env)
    train_step(backend, batch, cfg)          # Adam's moments exist from here on
    backend.measure(batch, cfg.batch.micro_size)  # gradients held, activations freed: the state's peak
    measured = live_tensor_bytes()
    backend.update(cfg.optim.lr, cfg.optim.grad_clip)
    tp = cfg.parallel.tp
    write_record(out, env, {"bytes": measured, "predicted": sum(state_bytes(cfg, env.world // tp, tp).values())})


SIZES = {"small": ["model.n_layer=4", "model.d_model=256", "model.n_head=4", "model.vocab_size=8192"],
         "gpt2-124m": ["model.preset=gpt2-124m"], "gpt2-350m": ["model.preset=gpt2-350m"]}
# (name, overrides, world sizes)
RUNS = [("none", [], (1,)), ("fsdp", ["parallel.backend=fsdp"], (1, 2)),
        ("zero2", ["parallel.backend=deepspeed", "parallel.zero_stage=2"], (1, 2)),
        ("zero3", ["parallel.backend=deepspeed", "parallel.zero_stage=3"], (1, 2)),
        ("fsdp-tp2", ["parallel.backend=fsdp", "parallel.tp=2"], (2, 4))]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default=",".join(SIZES))
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--runs", default=",".join(r[0] for r in RUNS), help="a subset of: none,fsdp,zero2,zero3,fsdp-tp2")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("extra", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    common = [f"model.seq_len={args.seq_len}", "batch.global_size=2", "batch.micro_size=1", "parallel.precision=bf16"]
    if args.worker:
        return worker(args.worker, common + args.extra)
    gib, result = 2**30, {"measure": "live tensor bytes per rank after backward (gradients held)", "runs": {}}
    for size in args.sizes.split(","):
        for name, extra, worlds in (r for r in RUNS if r[0] in args.runs.split(",")):
            for world in worlds:
                ranks = run_ranks(__file__, world, ["--seq-len", str(args.seq_len), *SIZES[size], *extra],
                                  threads=max(1, 2 // world))
                measured, predicted = max(r["bytes"] for r in ranks), ranks[0]["predicted"]
                result["runs"][f"{size}/{name}/world{world}"] = {
                    "measured_gib": round(measured / gib, 3), "predicted_gib": round(predicted / gib, 3),
                    "error": round(predicted / measured - 1, 3)}
    result["max_abs_error"] = max(abs(r["error"]) for r in result["runs"].values())
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
