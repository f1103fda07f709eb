"""What is anomalous: a loss far above where the run's own recent trend says it should be.

The rule, per step (``stability.*`` keys in brackets):

1. **Expect.** Fit a resistant line (Tukey's three-group line: the slope joins the
   medians of the first and last thirds) through the last [``trend``] normal losses
   and extrapolate it one step: the loss this step should have, but never less than
   the lowest of the last 3 normal losses.
2. **Spread.** Keep the last [``window``] one-step errors (loss minus expectation)
   of normal steps. The spread is their robust standard deviation, 1.4826 * MAD,
   floored at [``min_spread``] times the expected loss.
3. **Judge.** ``z = (loss - expected - median error) / spread``; the step is a
   ``spike`` when ``z`` > [``threshold``], once [``warmup``] normal steps were seen;
   right after a spike, already when ``z`` > ``threshold / 2``.
   A non-finite loss or gradient norm is always ``nonfinite``, warm-in or not.

Anomalous steps never join the history, so a run of bad batches cannot teach the
detector that bad batches are normal, and only upward deviations count (a loss that
falls fast is good news).

Why this rule, not median/MAD of the raw loss and grad norm (the previous one).
Measured with ``bench/stability.py``: clean runs of 7 shapes (smoke config, 3 seeds;
char batch 12; BPE batch 64; bytes batch 8 for 3000 steps; 30M parameters; 4950
steps in all) replayed offline, and real guarded runs with random tokens planted
over all, half or a quarter of the samples of 5 consecutive steps:

* **The gradient norm does not vote.** Small-batch grad norms are heavy-tailed:
  27 of the old rule's 28 false alarms on the clean runs (0.57% of steps) were
  grad-norm "spikes" of 6-28 robust sigmas with the loss z below 3. Planted garbage
  moved the grad norm less than that noise (at most 2.6 robust sigmas on a log scale
  for a quarter of a batch, 5.7 for a whole one) but the loss by 6-61. With
  clipping on, a large norm cannot make a large update anyway. The norm is still
  checked for NaN/inf, and the ledger records it with every anomaly.
* **A trend, not a level.** Early in a run the loss falls by several spreads per
  step; a window median lags far above it and the window's MAD is inflated by the
  descent itself, so the old rule (64 warm-up steps, then that window) missed every
  window planted at steps 12-16 and 60-63, even all-garbage ones. The extrapolated
  line follows the descent, and the spread of its *one-step errors* measures only
  what it cannot predict: batch-to-batch noise. Clean runs peaked at z = 5.0 (one
  step in 3000 of the batch-8 run; 2.5-3.9 elsewhere), hence the threshold 6. With
  the rule as it is now: 1 skip (z 6.8, step 19 of the 30M run) in 4950 clean steps
  (0.02%), no rollback, no abort; 8 of 9 planted windows caught (all mid- and
  late-run ones, whole and half batches right after warm-in).
* **Never below the latest losses.** A transient during warm-in (a real loss blow-up
  at the end of LR warm-up, which the unjudged warm-in steps let into the trend) makes
  the recovery look like a steep descent; extrapolated, it predicted a fall the run
  was not making, and clean steps scored 8-11: a healthy bf16 char run (lr 3e-3,
  batch 16) rolled back three times and aborted. Flooring the expectation at the
  latest losses costs a step of descent in sensitivity (the quarter-batch window
  right after warm-in below is no longer caught) and one skip on the clean traces.
* **Half the bar right after a spike.** Bad data comes in runs of batches, and a
  bad batch scoring just under the threshold joins the trend and hides the rest of
  its run: measured before the floor at the latest losses existed, a quarter of each
  batch garbage at steps 12-16 scored 7.2, 5.98, 6.2, and without the lower bar four
  of the five steps were applied. Clean steps pass
  z = 3 at a rate of 0.3-0.5%, so two more after a (never seen) clean spike would
  be a ~1e-5 event.
* **A floor relative to the level.** A very quiet run (large batches, a flat loss)
  has a tiny spread, and a harmless 1% wobble would be "many sigmas". It bound on
  8 of 300 steps of the batch-64 run, on none of the others.

Tuning. A noisier run (batches of a few thousand tokens, very mixed data) that
still gets false skips: the ledger's ``loss_z`` says by how much; raise
``threshold`` above it (8-10). Skips are cheap; a rollback needs
``max_consecutive`` anomalies in a row, which noise has never produced here. A
quieter run (large batches, where the loss moves by less than 1% from step to
step), or one where you want smaller bad windows caught: lower ``min_spread``
first (0.003), since the floor is what limits a quiet run, then ``threshold``
(5: the noisiest clean run above reached 5.0 once). A loss that still falls
steeply and unevenly after warm-in (a high learning rate, a batch-size ramp) wants
a larger ``warmup``; a longer ``trend`` averages more noise out of the expectation
but follows a bending curve less well.

Plain Python on numbers every rank already agrees on (the globally reduced loss
and gradient norm), O(``window``) per step (0.15 ms on a loaded 2-core CPU; numpy's
median costs more than it saves at these sizes): every rank reaches the same
verdict, and so does a resumed run, given :meth:`SpikeDetector.state_dict`.
"""
from __future__ import annotations

import math
from collections import deque
from statistics import median

OK, SPIKE, NONFINITE = "ok", "spike", "nonfinite"

# Right after a spike the next step is judged at this fraction of the threshold (module docstring).
AFTER_SPIKE = 0.5

# The expectation is never below the lowest of this many latest normal losses (see judge).
FLOOR_OF_LAST = 3

# 1 / Phi^-1(3/4): makes the MAD of normal data equal its standard deviation.
MAD_TO_SIGMA = 1.4826


def robust_stats(values) -> tuple[float, float]:
    """(median, robust sigma) of ``values``: sigma = 1.4826 * median(|x - median|)."""
    center = median(values)
    return center, MAD_TO_SIGMA * median([abs(x - center) for x in values])


def trend_next(values) -> float:
    """The next value of ``values`` (equally spaced) by Tukey's resistant line: the slope
    joins the medians of the first and last thirds, the intercept is the median residual.
    One outlier among the points moves it little; fewer than 3 points give their median."""
    y = list(values)
    n = len(y)
    if n < 3:
        return median(y)
    third = n // 3
    # the x of a third is the median of its indices: (third - 1) / 2 and n - 1 - (third - 1) / 2
    slope = (median(y[-third:]) - median(y[:third])) / (n - third)
    return median([v - slope * x for x, v in enumerate(y)]) + slope * n


class SpikeDetector:
    """Per-step verdict (ok | spike | nonfinite) from the loss's recent trend and its errors."""

    def __init__(self, window: int = 128, warmup: int = 10, threshold: float = 6.0,
                 trend: int = 8, min_spread: float = 0.01):
        self.window, self.warmup, self.threshold = window, warmup, threshold
        self.trend, self.min_spread = trend, min_spread
        self.losses: deque[float] = deque(maxlen=trend)   # the last normal losses: the trend
        self.errors: deque[float] = deque(maxlen=window)  # their one-step errors: the spread
        self.seen = 0  # normal steps seen in total
        self.after_spike = False  # the last judged finite step was a spike

    @classmethod
    def from_config(cls, cfg) -> "SpikeDetector":
        """From the ``stability`` section of a :class:`bigtrain.config.Config`."""
        return cls(cfg.window, cfg.warmup, cfg.threshold, cfg.trend, cfg.min_spread)

    @property
    def warm(self) -> bool:
        # at least 2 errors, so that a MAD exists (warmup >= 1 and a short trend could allow fewer)
        return self.seen >= self.warmup and len(self.errors) >= 2

    def score(self, loss: float, expected: float) -> dict:
        """The loss's z-score against the trend's ``expected`` loss and the errors' spread."""
        bias, spread = robust_stats(self.errors)
        spread = max(spread, self.min_spread * abs(expected), 1e-12)
        return {"loss_z": (loss - expected - bias) / spread, "expected": expected + bias, "spread": spread}

    def judge(self, loss: float, grad_norm: float, nonfinite: bool = False) -> tuple[str, dict]:
        """The verdict on one step and the numbers behind a spike; a normal step joins the history."""
        if nonfinite or not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return NONFINITE, {}
        # never below the lowest of the last few losses: a slope steepened by a recovery (a
        # transient during warm-in) must not predict a fall the run is not making
        expected = max(trend_next(self.losses), min(list(self.losses)[-FLOOR_OF_LAST:])) if self.losses else loss
        if self.warm:
            score = self.score(loss, expected)
            if score["loss_z"] > self.threshold * (AFTER_SPIKE if self.after_spike else 1.0):
                self.after_spike = True
                return SPIKE, {k: round(v, 6) for k, v in score.items()}
        self.after_spike = False
        if self.losses:
            self.errors.append(loss - expected)
        self.losses.append(loss)
        self.seen += 1
        return OK, {}

    def state_dict(self) -> dict:
        return {"seen": self.seen, "after_spike": self.after_spike,
                "losses": list(self.losses), "errors": list(self.errors)}

    def load_state_dict(self, state: dict) -> None:
        self.seen, self.after_spike = int(state["seen"]), bool(state["after_spike"])
        self.losses = deque((float(v) for v in state["losses"]), maxlen=self.trend)
        self.errors = deque((float(v) for v in state["errors"]), maxlen=self.window)
