"""``RUN_DIR/ledger.jsonl``: the run's record of decisions and events.

Metrics say how training went; the ledger says what the framework *did*: spikes
seen, updates skipped, rollbacks and the data windows they skipped, aborts,
preemptions, resumes. One JSON object per event with at least ``event`` and
``step``. Only rank 0 writes (every rank reaches the same decisions), and each
line is flushed at once so the ledger survives a kill -9.
"""
from __future__ import annotations

import json
import time
from pathlib import Path


class Ledger:
    def __init__(self, run_dir: str | Path, enabled: bool):
        self.path = Path(run_dir) / "ledger.jsonl"
        self.enabled = enabled
        self.tb = None  # set by the trainer when TensorBoard is on, to mark events there too
        self.wandb = None  # likewise for Weights & Biases (bigtrain.wandb_sink)

    def record(self, event: str, step: int, **fields) -> dict:
        entry = {"event": event, "step": step, **fields, "time": round(time.time(), 3)}
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(entry) + "\n")
            if self.tb is not None:
                self.tb.add_text("ledger", json.dumps(entry), step)
            if self.wandb is not None:
                self.wandb.event(entry)
        return entry

    def events(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
