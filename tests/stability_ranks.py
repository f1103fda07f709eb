"""Run under torchrun by tests/test_stability.py: the multi-rank stability checks in one launch.

For each backend (none, fsdp): a run whose last step gets a NaN gradient on rank 1
only, and a clean run one step shorter. If every rank skipped that step, each rank's
weights and optimizer state equal the shorter run's. Then the runs named in the JSON
argument (name -> tiny_config overrides: a ramp-up, a rollback), which the test
compares with one process. Each rank writes what it saw to ``OUT/rank-R.json``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from bigtrain.parallel.env import init_distributed, shutdown
from bigtrain.trainer import Trainer
from helpers import fit, read_jsonl, tiny_config

NAN_STEP = 4


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def snapshot(trainer: Trainer) -> tuple[dict, list]:
    params = {n: full(p) for n, p in trainer.backend.model.named_parameters()}
    opt = trainer.backend.optimizer
    moments = [(full(s["exp_avg"]), full(s["exp_avg_sq"]), int(s["step"])) for s in opt.state.values()]
    return params, moments


def main(data: str, out: str, runs: str) -> None:
    env = init_distributed("cpu")
    report: dict = {"rank": env.rank}
    for backend in ("none", "fsdp"):
        common = dict(parallel__backend=backend, schedule__decay="constant", eval__batches=0)
        faulty = fit(tiny_config(data, Path(out) / f"{backend}-nan", faults__nan_at=[NAN_STEP],
                                   faults__rank=1, schedule__max_steps=NAN_STEP, **common), env)
        clean = fit(tiny_config(data, Path(out) / f"{backend}-clean", schedule__max_steps=NAN_STEP - 1,
                                  **common), env)
        (p1, m1), (p2, m2) = snapshot(faulty), snapshot(clean)
        report[backend] = {
            "params_equal": all(torch.equal(p1[n], p2[n]) for n in p2),
            "moments_equal": len(m1) == len(m2) and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                                                        for a, b in zip(m1, m2)),
            "adam_steps": sorted({m[2] for m in m1}),
            "skipped": faulty.guard.counters()["skipped"],
            "verdict": [e["event"] for e in read_jsonl(Path(out) / f"{backend}-nan" / "ledger.jsonl")
                        if e["step"] == NAN_STEP][0],
        }
    for name, overrides in json.loads(runs).items():
        trained = fit(tiny_config(data, Path(out) / name, **overrides), env)
        report[name] = {"losses": [r["loss"] for r in read_jsonl(Path(out) / name / "metrics.jsonl") if "loss" in r],
                        "skips": trained.order.skips}
    Path(out, f"rank-{env.rank}.json").write_text(json.dumps(report))
    shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
