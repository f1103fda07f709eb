"""Run under torchrun by tests/test_culprits.py: find_culprits on 2 ranks with FSDP (or BACKEND).

Loads the consolidated weights of a checkpoint, shards them with the FSDP backend and
scores the global batches given as JSON lists of stream positions. Each rank writes
what it found to ``OUT/rank-R.json``, for the test to compare with one process.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from bigtrain.checkpoint import load_model
from bigtrain.config import load_config
from bigtrain.data.order import SampleOrder
from bigtrain.parallel.backend import build_backend
from bigtrain.parallel.env import init_distributed, shutdown
from bigtrain.stability.culprits import find_culprits
from bigtrain.trainer import open_splits


def main(run_dir: str, step: str, out: str, batches: str, backend: str = "fsdp") -> None:
    cfg = load_config(Path(run_dir) / "config.yaml", overrides=[f"parallel.backend={backend}"])
    env = init_distributed("cpu", group=True)
    _, train, _ = open_splits(cfg, verify=False)
    order = SampleOrder(train.num_samples(cfg.model.seq_len), cfg.seed)
    backend = build_backend(load_model(run_dir, int(step)), cfg, env)
    episode = [(np.array(p), order.sample_at(np.array(p))) for p in json.loads(batches)]
    found = find_culprits(backend, env, train, cfg.model.seq_len, cfg.batch.micro_size, episode)
    result = None if found is None else {"positions": found.positions, "scores": found.scores}
    Path(out, f"rank-{env.rank}.json").write_text(json.dumps(result))
    shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
