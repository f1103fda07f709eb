"""Weights & Biases as a third sink beside ``metrics.jsonl`` and TensorBoard (``logging.wandb``).

It receives what the other two receive: every scalar :class:`bigtrain.metrics.MetricsLogger`
writes (``train/``, ``eval/``, ``detail/``) and every ledger event (as its JSON line under
``ledger/<event>``). Only rank 0 has one. ``wandb`` is an optional dependency
(``pip install 'bigtrain[wandb]'``), imported only when the section is set.

Two choices keep it faithful to the run:

* The x-axis is bigtrain's step (the ``step`` metric), not W&B's own counter, which must
  only grow: after a rollback the run logs earlier steps again, and W&B would drop them.
* One bigtrain run is one W&B run. Its id is kept in ``RUN_DIR/wandb_id``, so a resumed or
  requeued run continues the same W&B run instead of starting a new one.

``mode: offline`` writes everything under ``RUN_DIR/wandb/`` without any network (upload
later with ``wandb sync RUN_DIR/wandb/offline-run-*``).
"""
from __future__ import annotations

import json
import secrets
from pathlib import Path

from bigtrain.errors import ConfigError


class WandbSink:
    def __init__(self, cfg, run_dir: str | Path):
        try:
            import wandb
        except ImportError:
            raise ConfigError("logging.wandb needs the wandb package: pip install 'bigtrain[wandb]'") from None
        run_dir, settings = Path(run_dir), cfg.logging.wandb
        id_file = run_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(6)
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(project=settings.project, entity=settings.entity, mode=settings.mode,
                              name=settings.name or run_dir.resolve().name, id=run_id, resume="allow",
                              dir=str(run_dir), config=cfg.to_dict(),
                              settings=wandb.Settings(console="off"))  # our console output is not a metric
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def scalars(self, step: int, record: dict, prefix: str) -> None:
        """The numbers of ``record``, as TensorBoard gets them (strings and flags stay in metrics.jsonl)."""
        values = {f"{prefix}/{k}": v for k, v in record.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
        self.run.log({"step": step, **values})

    def event(self, entry: dict) -> None:
        self.run.log({"step": entry["step"], f"ledger/{entry['event']}": json.dumps(entry)})

    def close(self) -> None:
        self.run.finish()
