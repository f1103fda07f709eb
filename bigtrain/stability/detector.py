"""What is anomalous: robust rolling statistics of the loss and the gradient norm.

A loss spike is a value far above what the run has been doing lately. "Lately"
is a bounded window of the last ``stability.window`` normal steps; "far above"
is measured in *robust* standard deviations, ``1.4826 * MAD`` (the median
absolute deviation, scaled so that it equals the standard deviation for normal
data). Median and MAD are used instead of mean and standard deviation because a
single spike in the window would inflate a standard deviation and hide the next
one (OLMo-core's skip-step rule has that weakness); the median barely moves.

Only upward deviations count: a loss that falls fast is good news. Anomalous
values are never added to the window, so a run of spikes cannot teach the
detector that spikes are normal. No spike is declared before ``stability.warmup``
normal steps have been seen: early training moves too fast for any baseline.
A non-finite loss or gradient is always anomalous, warm-in or not.

Everything here is plain Python on numbers every rank already agrees on (the
globally reduced loss and gradient norm), so every rank reaches the same verdict.
"""
from __future__ import annotations

import math
from collections import deque

import numpy as np

OK, SPIKE, NONFINITE = "ok", "spike", "nonfinite"

# 1 / Phi^-1(3/4): makes the MAD of normal data equal its standard deviation.
MAD_TO_SIGMA = 1.4826
# A window of identical values has MAD 0; floor the spread at this fraction of the
# median so that a tiny wobble of an otherwise flat curve is not an "infinite sigma" spike.
RELATIVE_FLOOR = 1e-3


def robust_stats(values) -> tuple[float, float]:
    """(median, robust sigma) of ``values``: sigma = 1.4826 * median(|x - median|), floored."""
    x = np.asarray(values, dtype=np.float64)
    median = float(np.median(x))
    sigma = MAD_TO_SIGMA * float(np.median(np.abs(x - median)))
    return median, max(sigma, RELATIVE_FLOOR * abs(median), 1e-12)


class SpikeDetector:
    """Per-step verdict (ok | spike | nonfinite) from windows of loss and grad norm."""

    SERIES = ("loss", "grad_norm")

    def __init__(self, window: int, warmup: int, threshold: float):
        self.window, self.warmup, self.threshold = window, warmup, threshold
        self.history = {name: deque(maxlen=window) for name in self.SERIES}
        self.seen = 0  # normal steps seen in total (the window only keeps the last ``window``)

    @property
    def warm(self) -> bool:
        return self.seen >= self.warmup

    def scores(self, values: dict[str, float]) -> dict[str, float]:
        """How many robust sigmas each value lies above its window's median."""
        out = {}
        for name in self.SERIES:
            median, sigma = robust_stats(self.history[name])
            out[name] = (values[name] - median) / sigma
        return out

    def judge(self, loss: float, grad_norm: float, nonfinite: bool = False) -> tuple[str, dict]:
        """The verdict for one step and the numbers behind it; a normal step joins the window."""
        values = {"loss": loss, "grad_norm": grad_norm}
        if nonfinite or not all(math.isfinite(v) for v in values.values()):
            return NONFINITE, {}
        if self.warm:
            scores = self.scores(values)
            if max(scores.values()) > self.threshold:
                return SPIKE, {f"{k}_z": round(v, 3) for k, v in scores.items()}
        for name, value in values.items():
            self.history[name].append(value)
        self.seen += 1
        return OK, {}

    def state_dict(self) -> dict:
        return {"seen": self.seen, **{name: list(self.history[name]) for name in self.SERIES}}

    def load_state_dict(self, state: dict) -> None:
        self.seen = int(state["seen"])
        for name in self.SERIES:
            self.history[name] = deque((float(v) for v in state[name]), maxlen=self.window)
