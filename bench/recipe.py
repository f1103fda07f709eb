"""The whole small recipe, start-up included: ``python -m bigtrain train`` against bare loops.

    python bench/recipe.py [--steps 2000] [--repeats 3]

Prints one JSON object (``bench/overhead.py`` runs the same as its ``recipe`` part). The recipe
is ``overhead.py``'s ``tiny`` model (``--steps`` steps, eval every 250 steps on 20 batches,
logging every 10, a checkpoint at the end), each run a fresh process: bigtrain's CLI, and this
file's ``--bare OPTIMIZER`` mode (the same work in :func:`overhead.bare_loop`, ``torch.save`` at
the end) twice: with bigtrain's fused AdamW (``bare``: what the loop around the model costs) and
with the AdamW nanoGPT's ``train.py`` builds off CUDA, torch's default (``bare_torch_adamw``: the
loop as a user writes it). The bare loops run with glibc's malloc as it starts, as a user's
script does; bigtrain keeps freed memory on the CPU (``parallel.keep_host_memory``, what that
alone buys: ``bench/allocator.py``). The children's CPU time is reported next to the wall time.
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

import torch

from bigtrain.config import load_config
from bigtrain.data.splits import open_splits
from overhead import QUIET, SIZES, bare_loop, data_dir

RECIPE = ["schedule.warmup_steps=100", "schedule.min_lr=1e-4", "eval.every=250", "eval.batches=20",
          "logging.every=10", "logging.tensorboard=false", "logging.progress=off", "checkpoint.every=0",
          "checkpoint.resume=never"]
RUNS = {"bare": ["--bare", "fused"], "bare_torch_adamw": ["--bare", "torch"], "bigtrain": None}


def recipe_args(tmp: Path, steps: int, run_dir: Path) -> list[str]:
    """The recipe as a command line: a config file (the CLI wants one) and overrides."""
    (tmp / "recipe.yaml").write_text(f"run_dir: {run_dir}\n")
    return [str(tmp / "recipe.yaml"), *QUIET, *SIZES["tiny"][0], *RECIPE, f"data.path={data_dir('char', tmp)}",
            f"run_dir={run_dir}", f"schedule.max_steps={steps}"]


def bare_recipe(optimizer: str, args: list[str]) -> None:
    """``--bare OPTIMIZER CONFIG OVERRIDES...``: the recipe's work in the bare loop, in this process."""
    cfg = load_config(args[0], overrides=args[1:])
    _, train, val = open_splits(cfg)
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    bare_loop(cfg, train, cfg.schedule.max_steps, cfg.logging.every, Path(cfg.run_dir) / "ckpt.pt",
              (cfg.eval.every, val, cfg.eval.batches), optimizer=optimizer)


def recipe(tmp: Path, steps: int, repeats: int) -> dict:
    """Each repeat runs the three recipes back to back, the order rotated from one repeat to the
    next (none always goes first); medians, and bigtrain over each bare loop per repeat."""
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    kinds = list(RUNS)
    walls, cpus = {k: [] for k in kinds}, {k: [] for k in kinds}
    for r in range(repeats):
        for kind in kinds[r % 3:] + kinds[:r % 3]:
            args = recipe_args(tmp, steps, tmp / f"recipe-{kind}-{r}")
            cmd = [sys.executable, "-m", "bigtrain", "train", *args] if kind == "bigtrain" else \
                [sys.executable, __file__, *RUNS[kind], *args]
            t0, c0 = time.perf_counter(), children_cpu()
            subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
            walls[kind].append(time.perf_counter() - t0)
            cpus[kind].append(children_cpu() - c0)
    out = {"steps": steps, "repeats": repeats,
           "median_s": {k: round(statistics.median(v), 2) for k, v in walls.items()},
           "all_s": {k: [round(x, 2) for x in v] for k, v in walls.items()},
           "cpu_s": {k: round(statistics.median(v), 2) for k, v in cpus.items()},
           "all_cpu_s": {k: [round(x, 2) for x in v] for k, v in cpus.items()}}
    for bare in kinds[:2]:
        pairs = [o / b for b, o in zip(walls[bare], walls["bigtrain"])]
        out[f"bigtrain_vs_{bare}"] = {
            "wall": round(statistics.median(walls["bigtrain"]) / statistics.median(walls[bare]), 4),
            "cpu": round(statistics.median(cpus["bigtrain"]) / statistics.median(cpus[bare]), 4),
            "pairs": [round(x, 4) for x in pairs], "pair_median": round(statistics.median(pairs), 4)}
    return out


def children_cpu() -> float:
    """CPU seconds (user + system) of this process's finished children (all their threads)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bare", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bare is not None:
        return bare_recipe(args.bare[0], args.bare[1:])
    with tempfile.TemporaryDirectory(prefix="bigtrain-recipe-") as scratch:  # the runs' directories
        tmp = Path(scratch)
        out = {"threads": torch.get_num_threads(), "load_before": os.getloadavg()[0],
               "recipe": recipe(tmp, args.steps, args.repeats), "load_after": os.getloadavg()[0]}
        print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
