"""Shared by bench/memory.py and bench/scaling.py: run a bench under torchrun on W
CPU processes and collect one JSON record per rank; build a backend without data.

The benches measure the backends themselves (``build_backend`` on a fresh
``GPT``, random tokens already in memory), so nothing but sharding and
communication differs between the runs they compare.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from bigtrain.config import Config, load_config
from bigtrain.data.loader import Batch
from bigtrain.model.gpt import GPT
from bigtrain.parallel.backend import Backend, build_backend
from bigtrain.parallel.env import DistEnv, init_distributed


def run_ranks(script: str, world: int, args: list[str], threads: int) -> list[dict]:
    """``torchrun --nproc-per-node world script --worker OUT args``; the records of every rank."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}",
               "--master-addr=127.0.0.1", f"--master-port={port}", script, "--worker", out, *args]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "DS_ACCELERATOR": "cpu"}
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-4000:]}")
        return [json.loads(p.read_text()) for p in sorted(Path(out).glob("rank*.json"))]


def write_record(out: str, env: DistEnv, record: dict) -> None:
    (Path(out) / f"rank{env.rank}.json").write_text(json.dumps({"rank": env.rank, **record}))


def build(overrides: list[str]) -> tuple[Config, DistEnv, Backend]:
    cfg = load_config(overrides=["parallel.device=cpu", *overrides])
    env = init_distributed("cpu", group=True).with_tp(cfg.parallel.tp)  # a (dp, tp) layout
    torch.manual_seed(cfg.seed)
    return cfg, env, build_backend(GPT(cfg.model), cfg, env)


def random_batch(cfg: Config, env: DistEnv) -> Batch:
    """A global batch of random tokens (the same on every rank: one seed); this rank's rows (a tp
    group's ranks read the same rows)."""
    size = cfg.batch.global_size
    rows = torch.randint(cfg.model.vocab_size, (size, cfg.model.seq_len + 1),
                         generator=torch.Generator().manual_seed(cfg.seed))
    positions = np.arange(size)
    return Batch(0, size, positions, positions, rows[env.dp_rank::env.dp_size].to(env.device))


def train_step(backend: Backend, batch: Batch, cfg: Config) -> None:
    """One optimizer step over this rank's rows, the trainer's recipe."""
    backend.measure(batch, cfg.batch.micro_size)
    backend.update(cfg.optim.lr, cfg.optim.grad_clip)
