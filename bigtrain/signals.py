"""Stopping a run cleanly: SIGTERM, SIGUSR1 or a ``RUN_DIR/STOP`` file.

Schedulers announce the end of a job with a signal: SLURM sends SIGTERM at
``scancel``, at the time limit and at preemption, and the signal chosen with
``#SBATCH --signal`` a grace period before the limit (our sbatch scripts turn it
into a ``STOP`` file, because torchrun's agent dies of SIGUSR1 instead of
passing it on). People say it with ``touch RUN_DIR/STOP``. Either way the training loop saves
a checkpoint at the next step boundary, records a ``preempt`` event and exits 0,
so the requeued or restarted job (``checkpoint.resume: auto``) loses nothing but
the step that was in flight.

The signal handler only records the signal: saving from inside a handler could
interrupt a collective halfway and deadlock the other ranks. At every step
boundary all ranks then agree, because a signal or a file may reach some ranks
and not others (a node-local ``STOP`` file, a signal sent to one node), and a
checkpoint needs every rank. The agreement costs no collective of its own: each
rank's :meth:`StopRequest.codes` ride on the step's one all-reduce
(:meth:`bigtrain.parallel.base.Backend.measure`), and :meth:`StopRequest.reason`
reads the sums when the host learns the step's values (a step later: every rank
learns them at the same step, so every rank stops at the same boundary).
"""
from __future__ import annotations

import signal
import threading
from pathlib import Path

import torch

from bigtrain.parallel.env import DistEnv

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# Reasons, ranked: the all-reduced maximum is the reason every rank reports.
REASONS = (None, "STOP file", "SIGUSR1", "SIGTERM")


class StopRequest:
    """Watches for the request to stop; install once per run, :meth:`close` at the end.

    Handlers are installed only from the main thread (Python's rule for signals);
    elsewhere the ``STOP`` file still works.
    """

    def __init__(self, run_dir: str | Path, env: DistEnv):
        self.stop_file = Path(run_dir) / "STOP"
        self.env = env
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def local_reason(self) -> str | None:
        """Why this rank wants to stop, or None."""
        return self.signal_name or ("STOP file" if self.stop_file.exists() else None)

    def codes(self) -> torch.Tensor:
        """This rank's request as one flag per reason (REASONS[1:]), to be summed over ranks.
        Pinned on CUDA, so that its copy to the device does not wait for the device."""
        reason = self.local_reason()
        flags = torch.tensor([float(reason == r) for r in REASONS[1:]])
        return flags.pin_memory() if self.env.device.type == "cuda" else flags

    @staticmethod
    def reason(summed: list[float]) -> str | None:
        """The reason every rank reports, from :meth:`codes` summed over ranks: the highest ranked."""
        asked = [r for r, n in zip(REASONS[1:], summed) if n > 0]
        return asked[-1] if asked else None

    def acted_on(self) -> None:
        """The loop has saved and recorded the stop: remove the ``STOP`` file, so that the
        next run does not stop at once. Every rank removes it: it may be node-local. A
        directory named ``STOP`` is not ours to delete: the next start refuses it with one line."""
        if not self.stop_file.is_dir():
            self.stop_file.unlink(missing_ok=True)

    def close(self) -> None:
        """Give the signals back to whoever handled them before."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
