"""logging.wandb: Weights & Biases gets the metrics and ledger events, offline, with no network.

The offline run files are read back with wandb's own reader (``wandb leet inspect --json``).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers import fit, read_jsonl, tiny_config

WANDB = dict(logging__wandb={"project": "bigtrain-test", "mode": "offline"})


def wandb_history(run_dir: Path) -> list[dict]:
    """Every history row of every offline W&B run under ``run_dir``, in the order written."""
    rows = []
    for log in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(log)],
                             capture_output=True, text=True, timeout=120, check=True).stdout
        rows += [r["history"]["item"] for r in map(json.loads, out.splitlines()) if r["type"] == "history"]
    return rows


def test_offline_wandb_run_holds_the_metrics_and_ledger_events(prose_bytes, tmp_path):
    run = tmp_path / "run"
    fit(tiny_config(prose_bytes, run, schedule__max_steps=4, faults__nan_at=[3], **WANDB))
    fit(tiny_config(prose_bytes, run, schedule__max_steps=6, **WANDB))  # resumes at step 4
    runs = sorted(p.name for p in (run / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({name.rsplit("-", 1)[1] for name in runs}) == 1  # one W&B run, continued
    history = wandb_history(run)

    logged = read_jsonl(run / "metrics.jsonl")
    train = {r["step"]: r["loss"] for r in logged if "loss" in r}
    assert {r["step"]: r["train/loss"] for r in history if "train/loss" in r} == train
    assert sorted(train) == [1, 2, 3, 4, 5, 6]
    evals = {r["step"]: r["val_loss"] for r in logged if "val_loss" in r}
    assert {r["step"]: r["eval/val_loss"] for r in history if "eval/val_loss" in r} == evals
    assert {r["step"]: r["train/grad_norm"] for r in history if "train/grad_norm" in r and r["step"] == 2} == \
        {2: next(r["grad_norm"] for r in logged if r["step"] == 2 and "grad_norm" in r)}

    ledger = [(e["event"], e["step"]) for e in read_jsonl(run / "ledger.jsonl")]
    events = [(k.removeprefix("ledger/"), r["step"]) for r in history for k in r if k.startswith("ledger/")]
    assert events == ledger and {("nonfinite", 3), ("skip", 3), ("resume", 4)} <= set(events)
    entry = next(json.loads(r["ledger/resume"]) for r in history if "ledger/resume" in r)
    assert entry["path"].endswith("step-00000004")
