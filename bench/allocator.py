"""What keeping freed host memory buys a CPU training step (``parallel.keep_host_memory``).

    python bench/allocator.py [--sizes tiny,25M,124M] [--rounds 3] [--steps tiny=150,25M=30,124M=20]

Prints one JSON object. For each of ``bench/overhead.py``'s sizes, the bare training loop
(:class:`overhead.BareStep`) runs in a fresh process with glibc's malloc as it starts
(``default``) and with :func:`bigtrain.host_memory.keep_freed_host_memory` applied before torch
is imported (``kept``); ``--rounds`` pairs, the order swapped every round, because the setting
is process-wide and this machine's speed drifts between runs. Each run warms up (the heap
settles within a few steps), then times ``--steps`` steps and reports per step: wall ms, CPU ms
(all threads), minor page faults, kernel (system) CPU ms; and the process's peak resident
memory. Medians over the rounds, and ``kept_vs_default`` for wall and CPU time (< 1: faster).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WARM = {"tiny": 20, "25M": 6, "124M": 6}


def child(mode: str, size: str, steps: int, tmp: str) -> None:
    """One timed run in this process: ``mode`` is ``default`` or ``kept``; prints its JSON line."""
    if mode == "kept":
        from bigtrain.host_memory import keep_freed_host_memory
        assert keep_freed_host_memory(), "this libc has no mallopt (not glibc)"
    import overhead  # after the setting: torch's own start-up allocations see it too
    cfg, (_, train, _) = overhead.size_config(size, Path(tmp), steps)
    step = overhead.BareStep(cfg, train)
    for _ in range(WARM[size]):
        step(log_every=10**9)
    before, t0, c0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter(), time.process_time()
    for _ in range(steps):
        step(log_every=10**9)
    after, t1, c1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter(), time.process_time()
    print(json.dumps({"ms": (t1 - t0) / steps * 1e3, "cpu_ms": (c1 - c0) / steps * 1e3,
                      "faults": (after.ru_minflt - before.ru_minflt) / steps,
                      "sys_ms": (after.ru_stime - before.ru_stime) / steps * 1e3,
                      "max_rss_MiB": after.ru_maxrss / 1024}))


def measure(size: str, steps: int, rounds: int, tmp: str) -> dict:
    runs = {"default": [], "kept": []}
    for r in range(rounds):
        for mode in (("default", "kept") if r % 2 == 0 else ("kept", "default")):
            out = subprocess.run([sys.executable, __file__, "--child", mode, size, str(steps), tmp],
                                 check=True, capture_output=True, text=True)
            runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = {mode: {k: round(statistics.median(run[k] for run in v), 2) for k in v[0]} for mode, v in runs.items()}
    return {"steps": steps, "rounds": rounds, **med,
            "kept_vs_default": {k: round(med["kept"][k] / med["default"][k], 4) for k in ("ms", "cpu_ms")},
            "all_ms": {mode: [round(run["ms"], 1) for run in v] for mode, v in runs.items()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="tiny,25M,124M")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", default="tiny=150,25M=30,124M=20")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        mode, size, steps, tmp = args.child
        return child(mode, size, int(steps), tmp)
    steps = dict((k, int(v)) for k, v in (s.split("=") for s in args.steps.split(",")))
    with tempfile.TemporaryDirectory(prefix="bigtrain-allocator-") as tmp:
        out = {"threads": int(os.environ.get("OMP_NUM_THREADS", "0")) or os.cpu_count(),
               "load_before": os.getloadavg()[0], "sizes": {}}
        for size in filter(None, args.sizes.split(",")):
            out["sizes"][size] = measure(size, steps[size], args.rounds, tmp)
        out["load_after"] = os.getloadavg()[0]
        print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
