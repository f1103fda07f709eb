"""Stopping outside SLURM: SIGTERM, SIGUSR1 or RUN_DIR/STOP checkpoint and exit 0, and the
resumed run continues exactly as if it had never stopped."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from helpers import REPO, free_port, rank_env, read_jsonl, tiny_overrides, train_losses

STEPS = 60


def write_config(tmp_path: Path) -> str:
    path = tmp_path / "tiny.yaml"
    path.write_text("parallel: {backend: none}\n")
    return str(path)


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until metrics.jsonl shows ``step`` (training is under way, handlers installed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(r.get("step", 0) >= step for r in read_jsonl(run_dir / "metrics.jsonl")):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError(f"no step {step} in {run_dir} after {timeout}s")


@pytest.fixture
def start():
    """Popen; whatever is left running at the end is killed, with its children."""
    procs: list[subprocess.Popen] = []

    def popen(args: list[str], env: dict) -> subprocess.Popen:
        procs.append(subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
        return procs[-1]
    yield popen
    for proc in procs:
        if proc.poll() is None:
            for p in [*psutil.Process(proc.pid).children(recursive=True), proc]:
                p.kill()
            proc.communicate()


def finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, out
    return out


def events(run_dir: Path) -> list[tuple[str, int]]:
    """Stops and resumes in the ledger (the stability guard may record spikes too)."""
    return [(e["event"], e["step"]) for e in read_jsonl(run_dir / "ledger.jsonl")
            if e["event"] in ("preempt", "resume")]


@pytest.mark.slow  # real processes (torchrun); `pytest -m 'not slow'` leaves it out
def test_sigterm_and_stop_file_checkpoint_exit_0_and_resume_exactly(prose_bytes, tmp_path, start):
    """Run 1 gets SIGTERM, run 2 (resumed) finds a STOP file, run 3 finishes: together they
    train exactly what one uninterrupted run trains."""
    def command(run_dir: Path) -> list[str]:
        return [sys.executable, "-m", "bigtrain", "train", write_config(tmp_path),
                *tiny_overrides(prose_bytes, run_dir, schedule__max_steps=STEPS)]

    reference, run = tmp_path / "reference", tmp_path / "run"
    uninterrupted = start(command(reference), rank_env(1))  # alongside, to save wall time
    cmd = command(run)
    proc = start(cmd, rank_env(1))
    wait_for_step(run, 3, proc)
    proc.send_signal(signal.SIGTERM)
    finish(proc)
    [(event, first)] = events(run)
    assert event == "preempt" and 3 <= first < STEPS
    assert read_jsonl(run / "ledger.jsonl")[-1]["reason"] == "SIGTERM"
    assert (run / "checkpoints" / f"step-{first:08d}").is_dir()

    proc = start(cmd, rank_env(1))
    wait_for_step(run, first + 3, proc)
    (run / "STOP").touch()
    finish(proc)
    second = events(run)[-1][1]
    assert events(run) == [("preempt", first), ("resume", first), ("preempt", second)]
    assert read_jsonl(run / "ledger.jsonl")[-1]["reason"] == "STOP file"
    assert not (run / "STOP").exists(), "the STOP file is removed once acted on"

    finish(start(cmd, rank_env(1)))
    assert events(run)[-1] == ("resume", second)
    finish(uninterrupted)
    losses, expected = train_losses(run), train_losses(reference)
    assert [s for s, _ in losses] == list(range(1, STEPS + 1)), "every step trained exactly once"
    assert losses == expected


@pytest.mark.slow  # real processes (torchrun); `pytest -m 'not slow'` leaves it out
def test_signal_to_one_rank_stops_every_rank_at_the_same_step(prose_bytes, tmp_path, start):
    """Two ranks under torchrun; only rank 1 gets SIGUSR1. Both agree, the checkpoint (a
    collective) is committed, and torchrun exits 0."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "bigtrain", "train", write_config(tmp_path),
           *tiny_overrides(prose_bytes, run, schedule__max_steps=STEPS)]
    proc = start(cmd, rank_env(1))
    wait_for_step(run, 3, proc)
    [rank1] = [p for p in psutil.Process(proc.pid).children() if p.environ().get("RANK") == "1"]
    rank1.send_signal(signal.SIGUSR1)
    finish(proc)
    [stop] = [e for e in read_jsonl(run / "ledger.jsonl") if e["event"] == "preempt"]
    assert stop["event"] == "preempt" and stop["reason"] == "SIGUSR1" and stop["step"] < STEPS
    ckpt = run / "checkpoints" / f"step-{stop['step']:08d}"
    assert ckpt.is_dir() and not list(run.glob("checkpoints/*.tmp"))
