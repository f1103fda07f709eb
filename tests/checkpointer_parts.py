"""A Checkpointer with real parts and no Trainer, for tests/test_checkpointer.py.

Run as a script, it is the process that gets killed in the middle of a checkpoint's
lifecycle: ``python checkpointer_parts.py RUN_DIR SCENARIO``. The kill is a real
SIGKILL at a chosen point of the real code path (a rename or a delete inside
RUN_DIR/checkpoints), so what it leaves on disk is what a crash there leaves.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import signal
import sys

import torch

from bigtrain.checkpoint import Checkpointer
from bigtrain.config import load_config
from bigtrain.model.gpt import GPT
from bigtrain.parallel.backend import build_backend
from bigtrain.parallel.env import DistEnv

CPU = DistEnv(rank=0, world=1, local_rank=0, device=torch.device("cpu"))


class Counter:
    """The smallest stateful part: plain data in, plain data out."""

    def __init__(self, value: int = 0):
        self.value = value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = int(state["value"])


def config(run_dir, *overrides: str):
    return load_config(overrides=[f"run_dir={run_dir}", "data.path=unused", "model.n_layer=1", "model.n_head=2",
                                  "model.d_model=16", "model.seq_len=8", "model.vocab_size=32",
                                  "parallel.precision=fp32", *overrides])


def build(run_dir, *overrides: str, log=None, before_commit=None):
    """(checkpointer, parts) for a fresh process-local run in ``run_dir``."""
    cfg = config(run_dir, *overrides)
    torch.manual_seed(0)
    parts = {"model": build_backend(GPT(cfg.model), cfg, CPU), "counter": Counter()}
    return Checkpointer(cfg, CPU, log=log or (lambda line: None), before_commit=before_commit), parts


def fill(parts: dict, value: float) -> None:
    """Give the model a recognisable state: every parameter ``value``, the counter too."""
    with torch.no_grad():
        for p in parts["model"].model.parameters():
            p.fill_(value)
    parts["counter"].value = int(value)


def value_of(parts: dict) -> float:
    values = {float(v) for p in parts["model"].model.parameters() for v in p.detach().unique()}
    assert len(values) == 1, values
    return values.pop()


def kill_when(predicate) -> None:
    """SIGKILL this process at the first rename or delete for which ``predicate(name, op)`` holds."""
    rename, rmtree = pathlib.Path.rename, shutil.rmtree

    def checked_rename(self, target):
        if predicate(self.name, "rename"):
            os.kill(os.getpid(), signal.SIGKILL)
        return rename(self, target)

    def checked_rmtree(path, *args, **kwargs):
        if pathlib.Path(path).exists() and predicate(pathlib.Path(path).name, "rmtree"):
            os.kill(os.getpid(), signal.SIGKILL)
        return rmtree(path, *args, **kwargs)

    pathlib.Path.rename, shutil.rmtree = checked_rename, checked_rmtree


def main(run_dir: str, scenario: str) -> None:
    ckpt, parts = build(run_dir)
    if scenario.startswith("resave"):
        fill(parts, 1.0)
        ckpt.load(ckpt.save(2, parts), parts)  # a load, as in a rollback: step 2 may be saved again
        fill(parts, 2.0)
        if scenario == "resave-killed-before-commit":   # the old one is aside, the new one not yet committed
            kill_when(lambda name, op: op == "rename" and name == "step-00000002.tmp")
        else:                                           # the new one committed, the old one not yet deleted
            kill_when(lambda name, op: op == "rmtree" and name.endswith(".old"))
        ckpt.save(2, parts)
    elif scenario == "abandon-killed-before-delete":
        for step in (2, 4, 6):
            fill(parts, float(step))
            ckpt.save(step, parts)
        kill_when(lambda name, op: op == "rmtree")
        ckpt.abandon_after(2)
    raise SystemExit(f"scenario {scenario}: not killed")


if __name__ == "__main__":
    main(*sys.argv[1:])
