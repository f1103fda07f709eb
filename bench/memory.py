"""Per-rank state memory, measured against ``bigtrain plan``'s prediction, on 1, 2 and 4 ranks.

    python bench/memory.py [--sizes small,gpt2-124m,gpt2-350m] [--seq-len 128] [--runs none,fsdp,zero2,zero3,fsdp-tp2]

Each run builds the model, takes one bf16 training step on random tokens (so Adam's
moments exist), runs the next step's forward and backward, and then counts every tensor
alive in the rank's process, each storage once: on a CPU the analogue of
``torch.cuda.memory_allocated`` at the state's peak (parameters, master weights, Adam
moments, gradients, communication buffers; the activations are freed by then). The
prediction is ``bigtrain.plan.state_bytes`` for the same config, data-parallel size and
tensor-parallel degree; the target is ``error`` within 15%. The step's peak too: the tensors
alive before the step plus the most the profiler's allocation events show allocated at once
during its forward and backward (``peak_gib``), against the plan's state + activations + in
flight (``peak_error``). The layouts: no sharding, FSDP, ZeRO-2 and ZeRO-3 on 1 and 2 ranks,
FSDP with tensor parallelism (``parallel.tp=2``) at (dp 1, tp 2) and (dp 2, tp 2), and FSDP with
the token table gathered by its root or used on its shards (``parallel.vocab_table``; the
``wide-vocab`` size is the one whose table outweighs its blocks). Prints one JSON object.
"""
from __future__ import annotations

import argparse
import gc
import json

import torch

from bigtrain.plan import activation_bytes, in_flight_bytes, state_bytes
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


def allocated_peak(prof) -> int:
    """The most bytes allocated (and not yet freed) at once while ``prof`` recorded: the
    profiler's memory events, in order (tensors from before it started are not in them)."""
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    now = peak = 0
    for e in events:
        now += e.nbytes()
        peak = max(peak, now)
    return peak


def worker(out: str, model: list[str]) -> None:
    cfg, env, backend = build(model)
    batch = random_batch(cfg, env)
    train_step(backend, batch, cfg)          # Adam's moments exist from here on; gradients dropped
    before = live_tensor_bytes()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        backend.measure(batch, cfg.batch.micro_size)  # gradients held, activations freed: the state's peak
    measured = live_tensor_bytes()
    backend.update(cfg.optim.lr, cfg.optim.grad_clip)
    tp, micro = cfg.parallel.tp, cfg.batch.micro_size
    predicted = sum(state_bytes(cfg, env.world // tp, tp).values())
    step = activation_bytes(cfg, micro, cfg.parallel.activation_checkpointing, tp, cfg.parallel.loss_parallel) \
        + in_flight_bytes(cfg, micro, tp, env.world // tp)
    write_record(out, env, {"bytes": measured, "predicted": predicted,
                            "peak": before + allocated_peak(prof), "predicted_peak": predicted + step})


SIZES = {"small": ["model.n_layer=4", "model.d_model=256", "model.n_head=4", "model.vocab_size=8192"],
         "wide-vocab": ["model.n_layer=2", "model.d_model=256", "model.n_head=4", "model.vocab_size=50257"],
         "gpt2-124m": ["model.preset=gpt2-124m"], "gpt2-350m": ["model.preset=gpt2-350m"]}
# (name, overrides, world sizes)
RUNS = [("none", [], (1,)), ("fsdp", ["parallel.backend=fsdp"], (1, 2)),
        ("zero2", ["parallel.backend=deepspeed", "parallel.zero_stage=2"], (1, 2)),
        ("zero3", ["parallel.backend=deepspeed", "parallel.zero_stage=3"], (1, 2)),
        ("fsdp-tp2", ["parallel.backend=fsdp", "parallel.tp=2"], (2, 4)),
        ("fsdp-table-gathered", ["parallel.backend=fsdp", "parallel.vocab_table=gather"], (2,)),
        ("fsdp-table-sharded", ["parallel.backend=fsdp", "parallel.vocab_table=sharded"], (2,))]


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
    gib, result = 2**30, {"measure": "live tensor bytes per rank after backward (gradients held); peak: those "
                                     "before the step plus the most allocated at once during it", "runs": {}}
    for size in args.sizes.split(","):
        for name, extra, worlds in (r for r in RUNS if r[0] in args.runs.split(",")):
            for world in worlds:
                ranks = run_ranks(__file__, world, ["--seq-len", str(args.seq_len), *SIZES[size], *extra],
                                  threads=max(1, 2 // world))
                measured, predicted = max(r["bytes"] for r in ranks), ranks[0]["predicted"]
                peak, predicted_peak = max(r["peak"] for r in ranks), ranks[0]["predicted_peak"]
                result["runs"][f"{size}/{name}/world{world}"] = {
                    "measured_gib": round(measured / gib, 3), "predicted_gib": round(predicted / gib, 3),
                    "error": round(predicted / measured - 1, 3),
                    "peak_gib": round(peak / gib, 3), "predicted_peak_gib": round(predicted_peak / gib, 3),
                    "peak_error": round(predicted_peak / peak - 1, 3)}
    result["max_abs_error"] = max(abs(r["error"]) for r in result["runs"].values())
    result["max_abs_peak_error"] = max(abs(r["peak_error"]) for r in result["runs"].values())
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
