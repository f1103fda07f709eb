"""Is the spike guard precise enough to leave on? False alarms on clean runs, detection
of real bad data, and its cost per step.

    python bench/stability.py [--quick] [--traces DIR]

Prints one JSON object with three parts:

* ``clean``: false alarms with the default ``stability`` settings on clean runs of
  several shapes (bytes/char/BPE tokenizers, batch 8-64, 0.25M-28.5M parameters,
  150-3000 steps with warm-up then cosine, the smoke config under 3 seeds). Each
  shape is trained once with the guard off and ``logging.every=1``; the detector,
  a pure function of the (loss, grad norm) series, is then replayed on it. Per
  shape and in total: skips, would-be rollbacks (``max_consecutive`` anomalies in a
  row) and aborts (rollbacks past ``max_rollbacks``; without checkpoints, as with
  the default ``checkpoint.every: 0``, every rollback is an abort), and the skip
  rate. A replay keeps going after an alarm, where a real run would have changed
  course; on a clean run there should be none.
* ``detection``: real guarded runs of a small char-level model on a copy of the
  corpus in which random tokens were written (bench/garbage.py) over all, or a
  fraction, of the samples that 5 consecutive steps read, early (right after the
  detector's warm-in), mid-run and late. A window is *caught* when every planted
  sample was read only by steps judged anomalous (or skipped by a rollback) and the
  episode rolled back. Also reported: anomalies outside the planted windows.
* ``cost``: the guard's time per step (``judge`` + ``after_step`` with a full
  window) against bigtrain's real ``train_step`` on the smoke and 30M models.

Cost: about 15 minutes of one CPU core in full, a third of it the 30M trace (on
this 2-core machine shared five ways the clean traces took 53 minutes of wall
time); ``--quick`` (one smoke trace, 3 detection runs, the smoke model's cost)
about 1.5 minutes of CPU. ``--traces DIR`` keeps each clean trace (and the
prepared corpora) there and reuses them on the next call.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from bigtrain.config import StabilityConfig, load_config
from bigtrain.data.prepare import prepare
from bigtrain.parallel.env import DistEnv
from bigtrain.stability.detector import OK, SpikeDetector
from bigtrain.stability.guard import StabilityAbort
from bigtrain.trainer import Trainer
from common import MODELS, SHAKESPEARE
from garbage import plant

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"
CPU = DistEnv(0, 1, 0, torch.device("cpu"))
QUIET = ["logging.tensorboard=false", "logging.progress=off", "eval.every=0", "eval.batches=0",
         "checkpoint.every=0", "checkpoint.resume=never"]

# Clean shapes: (corpus, tokenizer, overrides of configs/smoke.yaml). Shakespeare falls back to stdlib.
SHAPES = {
    "smoke-s1234": ("stdlib", "bytes", ["seed=1234"]),
    "smoke-s1": ("stdlib", "bytes", ["seed=1"]),
    "smoke-s2": ("stdlib", "bytes", ["seed=2"]),
    "char-b12": ("shakespeare", "char", ["batch.global_size=12", "batch.micro_size=12", "schedule.max_steps=600"]),
    "bpe-b64": ("shakespeare", "bpe:1024", ["batch.global_size=64", "batch.micro_size=64", "model.seq_len=32",
                                            "schedule.max_steps=300"]),
    "long-b8": ("stdlib", "bytes", ["model.n_layer=2", "model.d_model=96", "model.n_head=4", "model.seq_len=32",
                                    "batch.global_size=8", "batch.micro_size=8", "schedule.max_steps=3000",
                                    "schedule.warmup_steps=100"]),
    "m30-b8": ("stdlib", "bytes", ["model.n_layer=9", "model.n_head=8", "model.d_model=512", "model.seq_len=64",
                                   "batch.global_size=8", "batch.micro_size=8", "optim.lr=6e-4",
                                   "schedule.max_steps=150", "schedule.warmup_steps=15"]),
}
QUICK_SHAPES = ["smoke-s1234"]

# Detection: a ~0.1M-parameter char model, fp32, checkpoints every 10 steps for the rollback.
PLANT_RUN = ["model.n_layer=2", "model.n_head=2", "model.d_model=64", "model.seq_len=32", "batch.global_size=16",
             "batch.micro_size=16", "optim.lr=3e-3", "schedule.warmup_steps=10", "schedule.max_steps=200",
             "parallel.precision=fp32", "seed=7", "checkpoint.every=10", "checkpoint.keep=100",
             "logging.every=1", "logging.tensorboard=false", "logging.progress=off", "eval.batches=0"]
PLACEMENTS = {"early": 12, "mid": 100, "late": 180}  # first planted step; the default warm-up is 10 steps
PLANTED_STEPS = 5
FRACTIONS = [1.0, 0.5, 0.25]
QUICK_DETECTION = [("early", 1.0), ("early", 0.25), ("late", 0.5)]


def corpus(name: str, tokenizer: str, root: Path) -> str:
    source = str(SHAKESPEARE) if name == "shakespeare" and SHAKESPEARE.is_file() else "stdlib"
    out = root / f"{Path(source).stem}-{tokenizer.replace(':', '')}"
    if not (out / "manifest.json").is_file():
        prepare(source, tokenizer, str(out), overwrite=True)
    return str(out)


def read_metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r and "grad_norm" in r]


def fit(cfg) -> str | None:
    """Train ``cfg`` to the end in this process; the abort message if the guard aborted."""
    trainer = Trainer(cfg, CPU)
    try:
        trainer.fit()
    except StabilityAbort as e:
        return str(e)
    finally:
        trainer.close()
    return None


# ---------------------------------------------------------------- false alarms on clean runs
def clean_trace(name: str, traces: Path, tmp: Path) -> dict:
    """The (loss, grad norm) series of a clean run of shape ``name``, from ``traces`` if kept there."""
    source, tokenizer, overrides = SHAPES[name]
    kept = traces / f"{name}.json"
    if kept.is_file() and json.loads(kept.read_text())["overrides"] == overrides:
        return json.loads(kept.read_text())
    run_dir = tmp / "clean" / name
    cfg = load_config(SMOKE, overrides=QUIET + ["stability.enabled=false", "logging.every=1",
                                                f"data.path={corpus(source, tokenizer, traces / 'data')}",
                                                f"run_dir={run_dir}"] + overrides)
    t0 = time.time()
    fit(cfg)
    rows = read_metrics(run_dir)
    trace = {"overrides": overrides, "seconds": round(time.time() - t0, 1),
             "loss": [r["loss"] for r in rows], "grad_norm": [r["grad_norm"] for r in rows]}
    kept.write_text(json.dumps(trace))
    return trace


def replay(trace: dict, stability: StabilityConfig) -> dict:
    """False alarms of the default detector on a clean trace, and what the guard would have done."""
    detector, run, episodes = SpikeDetector.from_config(stability), 0, 0
    anomalies = []
    for step, (loss, grad_norm) in enumerate(zip(trace["loss"], trace["grad_norm"]), 1):
        kind, details = detector.judge(loss, grad_norm)
        run = 0 if kind == OK else run + 1
        if kind != OK:
            anomalies.append({"step": step, **details})
        if run == stability.max_consecutive:
            episodes, run = episodes + 1, 0
    aborts = max(0, episodes - stability.max_rollbacks)  # with checkpoints; without, every rollback aborts
    return {"steps": len(trace["loss"]), "skips": len(anomalies), "rollbacks": episodes, "aborts": aborts,
            "anomalies": anomalies[:10]}


def clean(names: list[str], traces: Path, tmp: Path) -> dict:
    out = {}
    for name in names:
        trace = clean_trace(name, traces, tmp)
        out[name] = {**replay(trace, StabilityConfig()), "train_s": round(trace["seconds"])}
    steps = sum(r["steps"] for r in out.values())
    total = {k: sum(r[k] for r in out.values()) for k in ("steps", "skips", "rollbacks", "aborts")}
    return {"shapes": out, "total": {**total, "skip_rate_pct": round(100 * total["skips"] / steps, 4)}}


# ---------------------------------------------------------------- detection of planted garbage
def planted_run(data: str, placement: str, fraction: float, tmp: Path) -> dict:
    name = f"{placement}-f{fraction}"
    run_dir = tmp / "planted" / name
    overrides = PLANT_RUN + [f"run_dir={run_dir}"]
    first = PLACEMENTS[placement]
    steps = list(range(first, first + PLANTED_STEPS))
    planted = plant(data, tmp / "planted-data" / name, load_config(overrides=overrides + [f"data.path={data}"]),
                    steps, fraction)
    aborted = fit(load_config(overrides=overrides + [f"data.path={tmp / 'planted-data' / name}"]))
    path = run_dir / "ledger.jsonl"  # no event at all: no ledger file
    ledger = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    anomalies = [e for e in ledger if e["event"] in ("spike", "nonfinite")]
    rollbacks = [e for e in ledger if e["event"] == "rollback"]
    covered = [(e["start"], e["end"]) for e in anomalies] + [tuple(s) for e in rollbacks for s in e["skips"]]
    positions = [p for s in steps for p in planted[s]["positions"]]
    outside = [e["step"] for e in anomalies if not any(e["start"] <= p < e["end"] for p in positions)]
    applied = [p for p in positions if not any(a <= p < b for a, b in covered)]
    return {"placement": placement, "fraction": fraction, "steps": steps, "caught": not applied and bool(rollbacks),
            "planted_samples": len(positions), "planted_samples_applied": len(applied),
            "anomalous_steps": [e["step"] for e in anomalies], "loss_z": [e.get("loss_z") for e in anomalies],
            "rollbacks": len(rollbacks), "anomalies_outside_window": outside, "aborted": aborted}


def detection(cases: list[tuple[str, float]], traces: Path, tmp: Path) -> dict:
    data = corpus("shakespeare", "char", traces / "data")
    runs = [planted_run(data, placement, fraction, tmp) for placement, fraction in cases]
    per = {}
    for r in runs:
        per.setdefault(r["placement"], []).append(r["caught"])
    return {"runs": runs, "caught": sum(r["caught"] for r in runs), "of": len(runs),
            "rate_by_placement": {k: sum(v) / len(v) for k, v in per.items()},
            "false_alarms_outside_windows": sum(len(r["anomalies_outside_window"]) for r in runs)}


# ---------------------------------------------------------------- cost per step
def step_time(trainer: Trainer, steps: int) -> float:
    size, position = trainer.cfg.batch.global_size, 0
    times = []
    for i in range(steps + 2):  # two warm-up steps: allocator, kernels, AdamW state
        batch = trainer.loader.get(position, size)
        t0 = time.perf_counter()
        trainer.train_step(batch)
        times.append(time.perf_counter() - t0)
        position = batch.next_position
    return sorted(times[2:])[len(times[2:]) // 2]


def guard_time(trainer: Trainer, calls: int) -> float:
    """judge + after_step on normal steps, after a full window: what every step of a long run pays."""
    guard, rng = trainer.guard, random.Random(0)
    batch = trainer.loader.get(0, trainer.cfg.batch.global_size)
    for _ in range(guard.cfg.window + guard.cfg.trend):
        guard.judge(2.0 + rng.gauss(0, 0.01), 1.0 + rng.gauss(0, 0.01), False)
    t0 = time.perf_counter()
    for _ in range(calls):
        verdict = guard.judge(2.0 + rng.gauss(0, 0.01), 1.0 + rng.gauss(0, 0.01), False)
        guard.after_step(1, batch.step_position, batch.next_position, batch.size)
    assert verdict.apply
    return (time.perf_counter() - t0) / calls


def cost(models: list[str], data: str, tmp: Path, steps: int, calls: int) -> dict:
    out = {}
    for name in models:
        cfg = load_config(overrides=MODELS[name] + QUIET + ["parallel.precision=bf16", f"data.path={data}",
                                                            f"run_dir={tmp / 'cost' / name}"])
        trainer = Trainer(cfg, CPU)
        try:
            step, guard = step_time(trainer, steps), guard_time(trainer, calls)
            out[name] = {"params_M": round(trainer.model.num_params() / 1e6, 2), "step_ms": round(step * 1e3, 2),
                         "guard_us": round(guard * 1e6, 1), "guard_overhead_pct": round(100 * guard / step, 4)}
        finally:
            trainer.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="one clean shape, 3 detection runs, the smoke model's cost")
    ap.add_argument("--traces", default=None, help="keep clean traces and prepared corpora here and reuse them")
    ap.add_argument("--steps", type=int, default=6, help="train steps timed per model for the cost")
    ap.add_argument("--calls", type=int, default=2000, help="guard calls timed")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bigtrain-bench-"))
    traces = Path(args.traces) if args.traces else tmp / "traces"
    (traces / "data").mkdir(parents=True, exist_ok=True)
    defaults = StabilityConfig().model_dump(exclude={"enabled", "trace_anomalies"})
    cases = QUICK_DETECTION if args.quick else [(p, f) for p in PLACEMENTS for f in FRACTIONS]
    with contextlib.redirect_stdout(sys.stderr):  # the trainer's own lines; stdout is the JSON
        out = {"threads": torch.get_num_threads(), "stability": defaults,
               "clean": clean(QUICK_SHAPES if args.quick else list(SHAPES), traces, tmp),
               "detection": detection(cases, traces, tmp),
               "cost": cost(["smoke"] if args.quick else list(MODELS), corpus("stdlib", "bytes", traces / "data"),
                            tmp, args.steps, args.calls)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    sys.exit(main())
