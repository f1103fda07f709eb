"""Skip the culprits, not the window: what a rollback throws away under each policy.

    python bench/culprits.py [--data DIR] [--every 50] [--quick]

Prints one JSON object. Real bad data is planted on disk (bench/garbage.py: random
tokens over a ``fraction`` of the samples that 3 consecutive steps read, at three
points of the run), on tiny Shakespeare (bytes; the stdlib corpus without ../shared).

* **offline**, per model and fraction: one run without the guard, checkpointing every
  ``--every`` steps. For each planted episode, the checkpoint before it is loaded and the
  episode's 3 batches are scored (``bigtrain.stability.culprits``), as the guard does
  after a rollback. The window policy skips every position from that checkpoint's data
  position to the end of the episode. Reported per policy: samples skipped, how many of
  them were clean (not planted), the fraction clean, planted samples missed. A control
  scores 3 clean batches after each checkpoint: any culprit found there is a false one.
  Cost: forwards over the episode's samples, in step-equivalents (a forward ~ 1/3 of a
  step, so 3 batches ~ 1 step) and measured: the search's wall time / a training step's.
* **end_to_end**: the tiny model with the guard on, once with ``stability.skip: window``
  and once with ``culprits``: the skip ledger at the end against the planted positions.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bigtrain.checkpoint import load_model
from bigtrain.config import load_config
from bigtrain.data.order import SampleOrder
from bigtrain.parallel.env import DistEnv
from bigtrain.stability.culprits import choose, score_samples
from bigtrain.trainer import Trainer
from common import MODELS, prepared_data
from garbage import plant

CPU = DistEnv(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
SHAPES = {"tiny": ["model.n_layer=2", "model.n_head=2", "model.d_model=64", "model.seq_len=32",
                   "batch.global_size=8", "batch.micro_size=8", "optim.lr=1e-3"],
          "smoke": MODELS["smoke"] + ["optim.lr=1e-3"]}
QUIET = ["logging.tensorboard=false", "logging.progress=off", "eval.batches=0", "parallel.precision=fp32",
         "schedule.warmup_steps=10", "schedule.decay=constant", "checkpoint.keep=100", "seed=3"]


def config(data: str, run_dir: Path, shape: str, extra: list[str]):
    return load_config(overrides=[f"data.path={data}", f"run_dir={run_dir}", *SHAPES[shape], *QUIET, *extra])


def train(cfg) -> tuple[Trainer, float]:
    """Train to the end; returns the trainer and the median wall time of a step."""
    shutil.rmtree(cfg.run_dir, ignore_errors=True)
    with contextlib.redirect_stdout(None):  # stdout is for the JSON
        trainer = Trainer(cfg, CPU)
    times, step = [], trainer.train_step

    def timed(batch):
        t0 = time.perf_counter()
        out = step(batch)
        times.append(time.perf_counter() - t0)
        return out
    trainer.train_step = timed
    with contextlib.redirect_stdout(None):
        trainer.fit()
    trainer.close()
    return trainer, float(np.median(times))


def policies(skipped_window: int, found: list[int], planted: list[int]) -> dict:
    planted_set, found_set = set(planted), set(found)
    clean_c = len(found_set - planted_set)
    return {"window": {"skipped": skipped_window, "clean": skipped_window - len(planted),
                       "fraction_clean": round(1 - len(planted) / skipped_window, 4), "missed": 0},
            "culprits": {"skipped": len(found), "clean": clean_c,
                         "fraction_clean": round(clean_c / max(len(found), 1), 4),
                         "missed": len(planted_set - found_set)}}


def offline(src: str, tmp: Path, shape: str, fraction: float, points: list[int], every: int) -> dict:
    steps = [p + k for p in points for k in range(3)]
    cfg = config(src, tmp / "run", shape, [f"schedule.max_steps={steps[-1]}", f"checkpoint.every={every}",
                                           "stability.enabled=false"])
    planted = plant(src, tmp / "planted", cfg, steps, fraction=fraction, seed=1)
    cfg = config(str(tmp / "planted"), tmp / "run", shape, [f"schedule.max_steps={steps[-1]}",
                                                             f"checkpoint.every={every}", "stability.enabled=false"])
    trainer, step_s = train(cfg)
    size, seq = cfg.batch.global_size, cfg.model.seq_len
    order = SampleOrder(trainer.train_split.num_samples(seq), cfg.seed)

    def search(checkpoint: int, first: int):
        batches = [(np.arange(s * size, (s + 1) * size),) for s in range(first - 1, first + 2)]
        batches = [(p, order.sample_at(p)) for (p,) in batches]
        model = load_model(cfg.run_dir, checkpoint)
        t0 = time.perf_counter()
        scores = score_samples(model, contextlib.nullcontext, CPU, trainer.train_split, seq,
                               cfg.batch.micro_size, batches)
        found = choose(scores, np.concatenate([p for p, _ in batches]))
        return found, time.perf_counter() - t0

    episodes = []
    for first in points:
        checkpoint = (first - 1) // every * every
        bad = sorted(p for s in range(first, first + 3) for p in planted[s]["positions"])
        found, search_s = search(checkpoint, first)
        control, _ = search(checkpoint, first + 3)  # the 3 clean batches right after the episode
        window = (first + 2 - checkpoint) * size
        episodes.append({"steps": [first, first + 2], "checkpoint": checkpoint, "planted": len(bad),
                         **policies(window, found.positions if found else [], bad),
                         "fell_back_to_window": found is None,
                         "search_step_equivalents": {"by_passes": 1.0,  # 3 batches, forward only
                                                     "measured": round(search_s / step_s, 3)},
                         "control_false_culprits": len(control.positions) if control else 0})
    total = {policy: {k: sum(e[policy][k] for e in episodes) for k in ("skipped", "clean", "missed")}
             for policy in ("window", "culprits")}
    for t in total.values():
        t["fraction_clean"] = round(t["clean"] / max(t["skipped"], 1), 4)
    return {"model": shape, "fraction": fraction, "every": every, "batch": size, "step_s": round(step_s, 4),
            "episodes": episodes, "total": total}


def end_to_end(src: str, tmp: Path, fraction: float, points: list[int], every: int) -> dict:
    steps = [p + k for p in points for k in range(3)]
    guard = [f"schedule.max_steps={steps[-1] + 10}", f"checkpoint.every={every}", "stability.window=32",
             "stability.warmup=20"]
    planted = plant(src, tmp / "planted", config(src, tmp / "x", "tiny", guard), steps, fraction=fraction, seed=1)
    bad = {p for v in planted.values() for p in v["positions"]}
    out = {"model": "tiny", "fraction": fraction, "every": every, "planted_steps": steps}
    for skip in ("window", "culprits"):
        cfg = config(str(tmp / "planted"), tmp / f"e2e-{skip}", "tiny", guard + [f"stability.skip={skip}"])
        trainer, _ = train(cfg)
        skipped = {p for a, b in trainer.order.skips for p in range(a, b)}
        events = [json.loads(line) for line in (Path(cfg.run_dir) / "ledger.jsonl").read_text().splitlines()]
        culprits = {e["step"]: set(e["positions"]) for e in events if e["event"] == "culprits"}
        rollbacks = []
        for e in events:
            if e["event"] == "rollback":
                dropped = {p for a, b in e["skips"] for p in range(a, b)}
                rollbacks.append({"step": e["step"], "to_step": e["to_step"], "culprits": e["step"] in culprits,
                                  "skipped": len(dropped), "clean": len(dropped - bad)})
        out[skip] = {"rollbacks": rollbacks, "skipped_updates": sum(e["event"] == "skip" for e in events),
                     "skipped": len(skipped), "clean": len(skipped - bad),
                     "fraction_clean": round(len(skipped - bad) / max(len(skipped), 1), 4),
                     "missed": len(bad - skipped)}  # planted and not in the skip ledger (maybe in a skipped update)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=None, help="a prepared data dir (default: tiny Shakespeare, bytes)")
    ap.add_argument("--every", type=int, default=50, help="checkpoint.every of the offline runs")
    ap.add_argument("--quick", action="store_true", help="the tiny model only")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = prepared_data(args.data, tmp)
        points = [2 * args.every + 1, 3 * args.every + 21, 4 * args.every + 41]
        cases = [("tiny", 0.25), ("tiny", 0.5)] + ([] if args.quick else [("smoke", 0.25), ("smoke", 0.5)])
        result = {"offline": [offline(src, tmp / f"{s}-{f}", s, f, points, args.every) for s, f in cases],
                  "end_to_end": end_to_end(src, tmp / "e2e", 0.5, [60, 100], 20)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
