"""The run directory nothing can corrupt (issue 16): one writer (``RUN_DIR/LOCK``), honest
``checkpoint.resume: never``, and one line + exit 2, with nothing of value lost, for each
hostile input below. Each case runs as a user would: ``python -m bigtrain train`` in a fresh
process (or ``main([...])`` for refusals that stop before training).

Cases (issue 16): a second run on a busy run_dir; a kill -9'd holder's stale lock; a SLURM
requeue of the holder's job; resume=never over committed checkpoints; run_dir a file or
unwritable (one rank and two); RUN_DIR/STOP a directory; a committed checkpoint renamed to
another step; a partial last line in metrics.jsonl / ledger.jsonl; a full disk during a save.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO, bigtrain, rank_env, read_jsonl, tiny_overrides, torchrun

from bigtrain.cli import main
from bigtrain.rundir import STALE_S


@pytest.fixture(scope="module")
def data(prose_bytes, tmp_path_factory) -> tuple[str, str]:
    """The prepared corpus and a config file: what `bigtrain train` needs besides overrides."""
    config = tmp_path_factory.mktemp("config") / "tiny.yaml"
    config.write_text("parallel: {backend: none}\n")
    return str(config), prose_bytes


def command(data: tuple[str, str], run_dir: Path | str, **extra) -> list[str]:
    config, path = data
    return ["train", config, *tiny_overrides(path, run_dir, **{"eval.batches": 0, **extra})]


def snapshot(path: Path) -> dict[str, str]:
    """Every file under ``path`` and a hash of its bytes: to prove nothing was changed."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def one_line(result) -> str:
    """The refusal: exit 2 and exactly one line on stderr."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, (result.returncode, result.stdout[-2000:], result.stderr)
    return lines[0]


def refused(capsys, argv: list[str]) -> str:
    """``main(argv)`` in this process: exit 2 and one line on stderr."""
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


def committed(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


# ---------------------------------------------------------------- one writer per run directory

def test_second_run_on_a_busy_run_dir_exits_2_and_the_first_finishes_untouched(data, tmp_path):
    run_dir = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "bigtrain",
                              *command(data, run_dir, **{"schedule.max_steps": 100000,
                                                                "checkpoint.every": 5,
                                                                # a rollback would log steps twice
                                                                "stability.enabled": False})],
                             cwd=REPO, env=rank_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "checkpoints" / "step-00000005").is_dir():  # it is training and checkpointing
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.05)
        second = bigtrain(command(data, run_dir, **{"schedule.max_steps": 20, "checkpoint.every": 1}))
        line = one_line(second)
        assert first.poll() is None, "the first run must still be running"
        assert "is in use by another bigtrain run" in line
        assert f"host {socket.gethostname()}, pid {first.pid}, since " in line
        (run_dir / "STOP").touch()  # the first run checkpoints and stops
        out, _ = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, out
    last = steps(run_dir)[-1]
    assert steps(run_dir) == list(range(1, last + 1))  # only its own steps, each once
    assert f"step-{last:08d}" in committed(run_dir)
    assert not any(name.endswith(".tmp") for name in committed(run_dir))
    assert not (run_dir / "LOCK").exists()  # released on a normal exit


def test_a_kill_9_leaves_a_stale_lock_that_the_next_start_takes_over(data, tmp_path):
    run_dir = tmp_path / "run"
    crashed = bigtrain(command(data, run_dir, **{"schedule.max_steps": 6, "checkpoint.every": 2,
                                                        "faults.crash_at": [3]}))
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    holder = json.loads((run_dir / "LOCK").read_text())
    resumed = bigtrain(command(data, run_dir, **{"schedule.max_steps": 6, "checkpoint.every": 2}))
    assert resumed.returncode == 0, resumed.stderr
    assert f"took over the lock of host {holder['host']}, pid {holder['pid']}" in resumed.stdout
    assert "its process is gone" in resumed.stdout
    assert "step-00000006" in committed(run_dir)
    assert not (run_dir / "LOCK").exists()


def plant_lock(run_dir: Path, host: str, job: str | None) -> None:
    """The lock as a run on another node of the cluster leaves it (heartbeat fresh)."""
    run_dir.mkdir(parents=True)
    (run_dir / "LOCK").write_text(json.dumps({"host": host, "pid": 4321, "started": None, "slurm_job": job,
                                              "since": time.time() - 60}) + "\n")


def test_a_requeue_of_the_same_slurm_job_gets_in_another_job_does_not(data, tmp_path):
    run_dir = tmp_path / "run"
    plant_lock(run_dir, "node-b", "4242")
    other_job = bigtrain(command(data, run_dir, **{"schedule.max_steps": 2}),
                         env={**rank_env(), "SLURM_JOB_ID": "999"})
    assert "host node-b, pid 4321, SLURM job 4242, since " in one_line(other_job)
    assert not (run_dir / "metrics.jsonl").exists() and (run_dir / "LOCK").exists()

    requeued = bigtrain(command(data, run_dir, **{"schedule.max_steps": 2}),
                        env={**rank_env(), "SLURM_JOB_ID": "4242"})
    assert requeued.returncode == 0, requeued.stderr
    assert "SLURM job 4242 was requeued" in requeued.stdout
    assert steps(run_dir) == [1, 2]


def test_a_lock_without_heartbeat_for_stale_s_is_taken_over(data, tmp_path, capsys):
    """A holder on another node that died: nobody there can tell, its heartbeat stops."""
    run_dir = tmp_path / "run"
    plant_lock(run_dir, "node-c", None)
    os.utime(run_dir / "LOCK", (time.time() - STALE_S - 5,) * 2)
    assert main(command(data, run_dir, **{"schedule.max_steps": 2})) == 0
    assert "took over the lock of host node-c, pid 4321, since " in capsys.readouterr().out
    assert not (run_dir / "LOCK").exists()


# ---------------------------------------------------------------- honest resume semantics

def test_resume_never_refuses_a_run_dir_that_holds_checkpoints(data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(command(data, run_dir, **{"schedule.max_steps": 4, "checkpoint.every": 2})) == 0
    before = snapshot(run_dir)
    line = refused(capsys, command(data, run_dir, **{"schedule.max_steps": 4, "checkpoint.every": 2,
                                                            "checkpoint.resume": "never"}))
    assert line.startswith("checkpoint.resume=never, but") and "use another run_dir" in line
    assert snapshot(run_dir) == before


def test_a_checkpoint_renamed_to_another_step_is_refused_or_passed_over(data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(command(data, run_dir, **{"schedule.max_steps": 4, "checkpoint.every": 2})) == 0
    (run_dir / "checkpoints" / "step-00000004").rename(run_dir / "checkpoints" / "step-00000008")
    before = snapshot(run_dir)
    line = refused(capsys, command(data, run_dir, **{"schedule.max_steps": 10, "checkpoint.every": 2}))
    assert "step-00000008' is named for step 8 but its meta.json says step 4" in line
    assert snapshot(run_dir) == before

    assert main(command(data, run_dir, **{"schedule.max_steps": 4, "checkpoint.every": 2,
                                                 "checkpoint.fallback": True})) == 0
    resume = [e for e in read_jsonl(run_dir / "ledger.jsonl") if e["event"] == "resume"][-1]
    assert resume["step"] == 2 and "named for step 8" in resume["passed_over"][0]


# ---------------------------------------------------------------- bad run directories

def test_a_run_dir_that_is_a_file_or_unwritable_or_whose_stop_is_a_directory(data, tmp_path, capsys):
    a_file = tmp_path / "run"
    a_file.write_text("my notes\n")
    assert "exists and is not a directory" in refused(capsys, command(data, a_file))
    assert a_file.read_text() == "my notes\n"

    assert "'/proc/bigtrain-x' is not writable" in refused(capsys, command(data, "/proc/bigtrain-x"))

    run_dir = tmp_path / "stop"
    (run_dir / "STOP").mkdir(parents=True)
    (run_dir / "STOP" / "keep.txt").write_text("x")
    assert "STOP is a directory" in refused(capsys, command(data, run_dir))
    assert snapshot(run_dir) == {"STOP/keep.txt": hashlib.sha256(b"x").hexdigest()}


def test_under_torchrun_every_rank_ends_with_rank_0s_refusal(data, tmp_path):
    """Only rank 0 creates the run directory; the others wait for its answer and stop with it."""
    result = torchrun(2, command(data, "/proc/bigtrain-x", **{"parallel.backend": "fsdp"}))
    assert result.returncode != 0
    said = [line for line in result.stderr.splitlines() if "is not writable" in line]
    assert sorted(line.split("]")[0] for line in said) == ["[rank 0", "[rank 1"], result.stderr[-3000:]
    assert len({line.split("] ", 1)[1] for line in said}) == 1


# ---------------------------------------------------------------- what a kill or a full disk leaves

def test_a_partial_last_line_in_metrics_and_ledger_is_dropped_once(data, tmp_path):
    run_dir = tmp_path / "run"
    assert bigtrain(command(data, run_dir, **{"schedule.max_steps": 2, "checkpoint.every": 2})).returncode == 0
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 4.')     # what a kill in the middle of a write leaves
    with open(run_dir / "ledger.jsonl", "a") as f:
        f.write('{"event": "spi')
    resumed = bigtrain(command(data, run_dir, **{"schedule.max_steps": 4, "checkpoint.every": 2}))
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.count("metrics.jsonl ended in a partial line") == 1
    assert resumed.stdout.count("ledger.jsonl ended in a partial line") == 1
    for name in ("metrics.jsonl", "ledger.jsonl"):  # every line parses
        assert all(json.loads(line) for line in (run_dir / name).read_text().splitlines())
    assert steps(run_dir) == [1, 2, 3, 4]


@pytest.fixture
def small_disk(tmp_path):
    """``mount(size)``: a tmpfs of ``size`` bytes at a fresh directory, unmounted at the end.
    None when this machine cannot mount (then the test limits the file size instead)."""
    mounted = []

    def mount(size: int) -> Path | None:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True).returncode != 0:
            return None
        mounted.append(where)
        return where
    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_a_full_disk_during_a_save_is_one_line_and_the_last_checkpoint_stays(data, tmp_path, small_disk):
    run_dir = tmp_path / "run"
    options = {"schedule.max_steps": 4, "checkpoint.every": 2}
    assert bigtrain(command(data, run_dir, **{**options, "schedule.max_steps": 2})).returncode == 0
    ckpts = run_dir / "checkpoints"
    files = [p for p in ckpts.rglob("*") if p.is_file()]
    pages = sum(math.ceil(p.stat().st_size / 4096) * 4096 for p in files)
    disk = small_disk(pages * 3 // 2 // 4096 * 4096)  # room for one checkpoint and a half
    limit = {}
    if disk is not None:   # the real thing: ENOSPC from a full file system
        shutil.copytree(ckpts, disk / "checkpoints")
        shutil.rmtree(ckpts)
        ckpts.symlink_to(disk / "checkpoints")
    else:                  # no mount here: the kernel refuses writes past RLIMIT_FSIZE (EFBIG)
        limit = {"preexec_fn": lambda: __import__("resource").setrlimit(
            __import__("resource").RLIMIT_FSIZE, (max(p.stat().st_size for p in files) // 2,) * 2)}
    before = snapshot(ckpts / "step-00000002")

    failed = subprocess.run([sys.executable, "-m", "bigtrain", *command(data, run_dir, **options)],
                            cwd=REPO, env=rank_env(), capture_output=True, text=True, timeout=300, **limit)
    line = one_line(failed)
    assert line.startswith("checkpoint step-00000004: ") and line.endswith(
        "removed the partial write, step 2 is the last committed checkpoint"), line
    assert ("no space left on device" if disk is not None else "file too large") in line
    assert committed(run_dir) == ["step-00000002"]       # no .tmp left filling the disk
    assert snapshot(ckpts / "step-00000002") == before
    assert not (run_dir / "LOCK").exists()

    if disk is not None:  # room again: the run resumes from the intact checkpoint
        subprocess.run(["mount", "-o", f"remount,size={pages * 4}", str(disk)], check=True)
    resumed = bigtrain(command(data, run_dir, **options))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and committed(run_dir)[-1] == "step-00000004"
