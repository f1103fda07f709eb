"""The spike rule of :mod:`bigtrain.stability.detector` on host floats, for runs on the CPU.

:class:`~bigtrain.stability.detector.SpikeDetector` judges on the device so that a CUDA step
never waits for the host. On the CPU the host *is* the device: reading the loss costs
nothing, and the device rule's ~110 tiny tensor ops cost about 1 ms a step on this
project's 2-core machine (3% of a 0.8M-parameter model's step, most of the guard's share
of bigtrain's overhead over a bare loop, bench/overhead.py). This class computes the same
rule with Python floats and ``statistics.median`` in about 0.1 ms, and gives bitwise the
same verdicts, spike details and state as the device rule (tests/test_detector.py compares
them on random streams with NaN, inf and planted spikes), so a checkpoint written by either
resumes under the other.
"""
from __future__ import annotations

import math
from collections import deque
from statistics import median

import torch

from bigtrain.stability.detector import AFTER_SPIKE, FLOOR_OF_LAST, KINDS, MAD_TO_SIGMA, NONFINITE, OK, SPIKE


def _trend_next(y: list[float]) -> float:
    """Tukey's resistant line through ``y`` (equally spaced), extrapolated one step: the slope
    joins the medians of the first and last thirds, the intercept is the median residual;
    fewer than 3 points give their median. (The device rule's ``trend_and_spread``.)"""
    n = len(y)
    if n < 3:
        return median(y)
    third = n // 3
    slope = (median(y[n - third:]) - median(y[:third])) / (n - third)
    return median([v - slope * x for x, v in enumerate(y)]) + slope * n


class HostSpikeDetector:
    """:class:`~bigtrain.stability.detector.SpikeDetector`'s rule, on the host: what the guard
    calls (``from_config``, ``verdict``, ``state_dict``, ``load_state_dict``)."""

    def __init__(self, window: int = 128, warmup: int = 10, threshold: float = 6.0,
                 trend: int = 8, min_spread: float = 0.01, device: torch.device | str = "cpu"):
        self.window, self.warmup, self.threshold = window, warmup, threshold
        self.trend, self.min_spread = trend, min_spread
        self.device = torch.device(device)
        self.load_state_dict({"seen": 0, "after_spike": False, "losses": [], "errors": []})

    @classmethod
    def from_config(cls, cfg, device: torch.device | str = "cpu") -> "HostSpikeDetector":
        return cls(cfg.window, cfg.warmup, cfg.threshold, cfg.trend, cfg.min_spread, device)

    def verdict(self, loss: torch.Tensor, grad_norm: torch.Tensor, nonfinite: torch.Tensor) -> tuple:
        """As the device rule's: ``(code, details)`` tensors; here the inputs are read."""
        kind, details = self._judge(float(loss), float(grad_norm), bool(nonfinite))
        return (torch.tensor(KINDS.index(kind), device=self.device),
                torch.tensor(details, dtype=torch.float64, device=self.device))

    def _judge(self, loss: float, grad_norm: float, nonfinite: bool) -> tuple[str, list[float]]:
        """The verdict and (loss_z, expected, spread), meaningful for a spike; a normal step
        joins the history."""
        if nonfinite or not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return NONFINITE, [0.0, 0.0, 0.0]
        losses, errors = list(self.losses), list(self.errors)
        expected = max(_trend_next(losses), min(losses[-FLOOR_OF_LAST:])) if losses else loss
        if self.seen >= self.warmup and len(errors) >= 2:
            bias = median(errors)
            spread = MAD_TO_SIGMA * median([abs(e - bias) for e in errors])
            spread = max(spread, self.min_spread * abs(expected), 1e-12)
            z = (loss - expected - bias) / spread
            if z > (self.threshold * AFTER_SPIKE if self.after_spike else self.threshold):
                self.after_spike = True
                return SPIKE, [z, expected + bias, spread]
        self.after_spike = False
        if losses:
            self.errors.append(loss - expected)
        self.losses.append(loss)
        self.seen += 1
        return OK, [0.0, 0.0, 0.0]

    def state_dict(self) -> dict:
        return {"seen": self.seen, "after_spike": self.after_spike,
                "losses": list(self.losses), "errors": list(self.errors)}

    def load_state_dict(self, state: dict) -> None:
        self.seen, self.after_spike = int(state["seen"]), bool(state["after_spike"])
        self.losses = deque((float(v) for v in state["losses"]), maxlen=self.trend)
        self.errors = deque((float(v) for v in state["errors"]), maxlen=self.window)
