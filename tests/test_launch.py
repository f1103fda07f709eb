"""`bigtrain launch` runs the launcher as its child: its exit status (3 when the run aborted,
so that no job script retries it) and the signals it passes on."""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from bigtrain.launch import Plan, run

# A stand-in for torchrun: records the signal it gets, then exits with the status asked for.
CHILD = """
import signal, sys, time, pathlib
out = pathlib.Path(sys.argv[1])
def stop(signum, frame):
    (out / "got").write_text(signal.Signals(signum).name)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
(out / "ready").touch()
if sys.argv[2] == "wait":
    time.sleep(60)
sys.exit(int(sys.argv[2]))
"""


def plan(run_dir: Path, action: str) -> Plan:
    run_dir.mkdir(parents=True, exist_ok=True)
    return Plan([sys.executable, "-c", CHILD, str(run_dir), action], {}, run_dir)


def aborted(run_dir: Path) -> None:
    (run_dir / "ABORTED").write_text(json.dumps({"step": 50, "reason": "persistent spikes"}))


@pytest.mark.parametrize("child_status, abort_file, status", [
    (0, False, 0), (1, False, 1), (1, True, 3), (3, True, 3),
    (0, True, 0),    # the job finished after all: a stale ABORTED file does not turn it into an abort
    (-9, False, 137),   # killed by SIGKILL: 128 + 9, as a shell reports it
])
def test_exit_status_is_the_launchers_or_3_when_the_run_aborted(tmp_path, child_status, abort_file, status):
    p = plan(tmp_path, str(child_status) if child_status >= 0 else "wait")
    if abort_file:
        aborted(tmp_path)
    if child_status < 0:
        bystanders = {c.pid for c in psutil.Process().children()}
        threading.Thread(target=kill_when_ready, args=(tmp_path, bystanders), daemon=True).start()
    assert run(p) == status


def kill_when_ready(run_dir: Path, bystanders: set[int]) -> None:
    """Kill the launched child: not one of ``bystanders``, the children this test process had
    before (e.g. the resource tracker multiprocessing starts when an earlier test ran a
    `prepare` with workers)."""
    wait_for(run_dir / "ready")
    [child] = {c.pid for c in psutil.Process().children()} - bystanders
    psutil.Process(child).kill()


def wait_for(path: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_sigterm_is_passed_on_and_sigusr1_becomes_a_stop_file(tmp_path, sig):
    """SIGTERM to `bigtrain launch` reaches the launcher; SIGUSR1 (which would kill torchrun's
    agent) asks the ranks to checkpoint and stop through RUN_DIR/STOP instead."""
    import os

    def signal_when_ready():
        wait_for(tmp_path / "ready")
        os.kill(os.getpid(), sig)
        if sig == signal.SIGUSR1:   # what the trainer would do on seeing STOP
            wait_for(tmp_path / "STOP")
            os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=signal_when_ready, daemon=True).start()
    assert run(plan(tmp_path, "wait")) == 0
    assert (tmp_path / "got").read_text() == "SIGTERM"
    assert (tmp_path / "STOP").exists() == (sig == signal.SIGUSR1)
