"""The run directory has one writer: ``RUN_DIR/LOCK``, and the repairs made when a run opens it.

Two trainings on one ``run_dir`` (a double submit, a requeue racing a manual restart)
would delete each other's unfinished checkpoint writes and interleave their metrics. So
rank 0 takes ``RUN_DIR/LOCK`` before anything touches the directory, and every other rank
waits for its answer (one broadcast): a refusal ends every rank with the same line.

The lock is a file created with ``O_CREAT | O_EXCL``, which is atomic on local disks and
on the shared file systems clusters use (NFSv3+, Lustre, GPFS), where ``flock`` may be
local to a node or absent. It holds the holder's host, pid, process start time, SLURM job
id and the time it was taken; a heartbeat thread touches it every ``HEARTBEAT_S``
seconds. A lock is *stale*, and the next start takes it over (and says so), when

* its holder ran on this host and that process is gone (kill -9, a crash, a reboot): the
  pid is gone or now belongs to a process started at another time;
* or the same SLURM job holds it and its process is gone or ran on another node: a
  requeue of the job gets back in;
* or it has not been touched for ``STALE_S`` seconds (a holder on another node that
  died; mtimes come from the nodes' clocks, so STALE_S leaves room for clock skew).

Taking over happens under a second ``O_EXCL`` file (``LOCK.takeover``), so that two
starts that both see a stale lock cannot both win. A normal exit removes the lock; a
process killed for good leaves a stale one. Only ``bigtrain train`` takes the lock; the
read-only tools (``inspect``, ``export``, ``report``) do not need it.

Opening the directory also refuses what would only fail later (``run_dir`` a file or not
writable, ``RUN_DIR/STOP`` a directory) and repairs what a kill leaves: a partial last
line in ``metrics.jsonl`` or ``ledger.jsonl`` is dropped, so the next record does not
glue onto it.
"""
from __future__ import annotations

import atexit
import json
import os
import socket
import threading
import time
from pathlib import Path

from bigtrain.config import ConfigError

LOCK = "LOCK"
HEARTBEAT_S = 30.0
STALE_S = 300.0          # no heartbeat for this long: the holder is gone (ten missed heartbeats)
TAKEOVER_STALE_S = 60.0  # a takeover file this old was left by a start that died halfway
JSONL = ("metrics.jsonl", "ledger.jsonl")


def _start_time(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, Linux), or None if unknown."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, started: str | None) -> bool:
    """Whether the process ``pid`` that started at ``started`` runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    now = _start_time(pid)
    return started is None or now is None or now == started  # a reused pid is another process


def _me() -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "started": _start_time(pid),
            "slurm_job": os.environ.get("SLURM_JOB_ID"), "since": time.time()}


def describe(holder: dict) -> str:
    job = f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else ""
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(holder.get("since", 0)))
    return f"host {holder.get('host')}, pid {holder.get('pid')}{job}, since {since}"


def _read(path: Path) -> tuple[dict | None, float | None]:
    """The lock's holder and the age of its last heartbeat, or (None, None) when there is no lock.
    An unreadable lock (a start that died between create and write) counts as a holder of
    unknown identity, stale only by age."""
    try:
        age = time.time() - path.stat().st_mtime
        text = path.read_text()
    except FileNotFoundError:
        return None, None
    try:
        return json.loads(text), age
    except ValueError:
        return {}, age


def stale(holder: dict, age: float) -> str | None:
    """Why the lock of ``holder`` (last heartbeat ``age`` seconds ago) no longer holds, or None."""
    me = _me()
    if age > STALE_S:
        return f"no heartbeat for {age:.0f} s"
    if holder.get("host") == me["host"] and holder.get("pid") == me["pid"]:
        return "held by this process"  # in-process tools and tests build trainers one after another
    same_host = holder.get("host") == me["host"]
    if same_host and isinstance(holder.get("pid"), int) and not _alive(holder["pid"], holder.get("started")):
        return "its process is gone"
    if me["slurm_job"] and holder.get("slurm_job") == me["slurm_job"] and not same_host:
        return f"SLURM job {me['slurm_job']} was requeued"
    return None


def busy(run_dir: Path, holder: dict) -> str:
    return (f"run_dir {str(run_dir)!r} is in use by another bigtrain run ({describe(holder)}); wait for it, "
            f"use another run_dir, or delete {run_dir / LOCK} if that run is gone")


def check(run_dir: str | Path, alone: bool = True) -> None:
    """Read-only: raise :class:`ConfigError` if ``run_dir`` cannot be trained into now (a file,
    ``STOP`` a directory, a live holder of the lock). The CLI calls it on every rank before any
    process group starts; :func:`open_run_dir` takes the lock for real. With several ranks
    (not ``alone``) a rank refuses a holder only when it runs on the holder's host, where
    whether the holder lives is a fact; elsewhere rank 0's answer decides for all."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run_dir {str(run_dir)!r} exists and is not a directory")
    if (run_dir / "STOP").is_dir():
        raise ConfigError(f"{run_dir / 'STOP'} is a directory; remove it (`touch RUN_DIR/STOP` asks a run to stop)")
    holder, age = _read(run_dir / LOCK)
    if holder is not None and stale(holder, age) is None and (alone or holder.get("host") == socket.gethostname()):
        raise ConfigError(busy(run_dir, holder))


class RunDirLock:
    """``RUN_DIR/LOCK``, held by this process until :meth:`release` (or the process exit)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self.me = _me()
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def acquire(self) -> str | None:
        """Take the lock; returns a line when a stale lock was taken over. Raises
        :class:`ConfigError` naming the holder when it is held."""
        note = None
        while not self._create():
            holder, age = _read(self.path)
            if holder is None:
                continue  # released meanwhile: try again
            why = stale(holder, age)
            if why is None:
                raise ConfigError(busy(self.path.parent, holder))
            if self._take_over(holder):
                if why != "held by this process":
                    note = f"run_dir: took over the lock of {describe(holder)} ({why})"
                break
        self._beat = threading.Thread(target=self._heartbeat, name="run-dir-lock", daemon=True)
        self._beat.start()
        atexit.register(self.release)
        return note

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(self.me) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return True

    def _take_over(self, seen: dict) -> bool:
        """Replace the stale lock ``seen``, unless another start got there first."""
        guard = self.path.with_name(LOCK + ".takeover")
        try:
            os.close(os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            try:
                if time.time() - guard.stat().st_mtime > TAKEOVER_STALE_S:
                    guard.unlink()
            except FileNotFoundError:
                pass
            time.sleep(0.1)
            return False  # the caller looks again
        try:
            holder, age = _read(self.path)
            if holder == seen and stale(holder, age) is not None:  # still the same stale lock
                self.path.unlink()
            return self._create()  # False: someone else holds it now; the caller looks again
        finally:
            guard.unlink(missing_ok=True)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass  # a file-system hiccup; the next beat tries again, STALE_S allows for ten misses

    def release(self) -> None:
        """Remove the lock if it is still ours."""
        self._stop.set()
        holder, _ = _read(self.path)
        if holder is not None and holder.get("host") == self.me["host"] and holder.get("pid") == self.me["pid"]:
            self.path.unlink(missing_ok=True)
        atexit.unregister(self.release)


def repair_jsonl(path: Path) -> str | None:
    """Drop a partial last line (what a kill in the middle of a write leaves); returns a line saying so."""
    try:
        with open(path, "rb+") as f:
            data = f.read()
            if not data or data.endswith(b"\n"):
                return None
            keep = data.rfind(b"\n") + 1
            f.truncate(keep)
    except FileNotFoundError:
        return None
    return (f"run_dir: {path.name} ended in a partial line ({len(data) - keep} bytes, left by an interrupted "
            "run); dropped it")


class RunDir:
    """The run directory while this run writes it. :func:`open_run_dir` makes one."""

    def __init__(self, path: Path, lock: RunDirLock | None, notes: list[str]):
        self.path, self.lock, self.notes = path, lock, notes

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()


def _open_on_main(run_dir: Path) -> tuple[RunDirLock | None, list[str] | str]:
    try:
        check(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = RunDirLock(run_dir)
        note = lock.acquire()
    except ConfigError as e:
        return None, str(e)
    except OSError as e:
        return None, f"run_dir {str(run_dir)!r} is not writable: {e.strerror or e}"
    notes = [note] if note else []
    try:
        notes += [line for name in JSONL if (line := repair_jsonl(run_dir / name))]
    except OSError as e:
        lock.release()
        return None, f"run_dir {str(run_dir)!r}: cannot repair its logs: {e.strerror or e}"
    return lock, notes


def open_run_dir(run_dir: str | Path, env) -> RunDir:
    """Rank 0 checks ``run_dir``, creates it, takes its lock and repairs its logs; every rank
    gets the answer (a collective) and raises the same one-line :class:`ConfigError` on a refusal."""
    run_dir = Path(run_dir)
    lock, answer = _open_on_main(run_dir) if env.is_main else (None, None)
    answer = env.broadcast_object(answer)
    if isinstance(answer, str):
        raise ConfigError(answer)
    return RunDir(run_dir, lock, answer)
