"""Helpers for tests: tiny configs and real multi-process launches."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from bigtrain.config import Config, load_config

REPO = Path(__file__).resolve().parents[1]


def tiny_overrides(data: str, run_dir: str | Path, **extra) -> list[str]:
    """A ~0.2M-parameter model that trains a step in milliseconds on one CPU core."""
    base = {
        "run_dir": str(run_dir), "data.path": data, "seed": 7,
        "model.n_layer": 2, "model.n_head": 2, "model.d_model": 64, "model.seq_len": 32,
        "batch.global_size": 8, "batch.micro_size": 4,
        "optim.lr": 3e-3, "schedule.warmup_steps": 2, "schedule.max_steps": 10,
        "logging.every": 1, "logging.tensorboard": False, "logging.progress": "off",
        "eval.batches": 2, "parallel.precision": "fp32", "data.prefetch": 1,
    }
    base.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in base.items()]


def tiny_config(data: str, run_dir: str | Path, **extra) -> Config:
    return load_config(overrides=tiny_overrides(data, run_dir, **extra))


def fit(cfg: Config, env=None):
    """Train ``cfg`` to the end in this process (one CPU rank unless ``env`` says otherwise)."""
    import torch

    from bigtrain.parallel.env import DistEnv
    from bigtrain.trainer import Trainer
    trainer = Trainer(cfg, env or DistEnv(rank=0, world=1, local_rank=0, device=torch.device("cpu")))
    try:
        trainer.fit()
    finally:
        trainer.close()
    return trainer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(threads: int = 1) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return env


def torchrun(nproc: int, args: list[str], timeout: float = 300, extra: list[str] = (),
             env: dict | None = None) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node N -m bigtrain <args>`` on CPU with gloo."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *extra, "-m", "bigtrain", *args]
    return subprocess.run(cmd, cwd=REPO, env=env or rank_env(), capture_output=True, text=True, timeout=timeout)


def bigtrain(args: list[str], timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m bigtrain <args>`` in a fresh process."""
    return subprocess.run([sys.executable, "-m", "bigtrain", *args], cwd=REPO, env=env or rank_env(2),
                          capture_output=True, text=True, timeout=timeout)


def read_jsonl(path: str | Path) -> list[dict]:
    p = Path(path)
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []


def train_losses(run_dir: str | Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_jsonl(Path(run_dir) / "metrics.jsonl") if "loss" in r]
