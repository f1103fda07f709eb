"""The spike detector's rule in closed form (bigtrain/stability/detector.py), and one real
run in which planted bad data is caught while the same run on clean data is left alone."""
from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch

from bigtrain.config import StabilityConfig
from bigtrain.stability.detector import KINDS, NONFINITE, OK, SPIKE, SpikeDetector, trend_next
from bigtrain.stability.host_detector import HostSpikeDetector
from helpers import REPO, fit, read_jsonl, tiny_config

sys.path.insert(0, str(REPO / "bench"))
from garbage import plant  # noqa: E402  (the benchmarks' planting, one copy)


def zigzag(n: int, start: float = 4.0, slope: float = -0.01, d: float = 0.05) -> list[float]:
    """A straight descent with +-d alternating noise. With trend 8 (thirds of 2 points) the
    resistant line through any 8 of its steps is the noise-free line: every error is +-d."""
    return [start + slope * t + d * (-1) ** t for t in range(n)]


def feed(det: SpikeDetector, losses, grad_norm: float = 1.0) -> list[str]:
    return [det.judge(x, grad_norm)[0] for x in losses]


# ---------------------------------------------------------------- the expectation and the spread
def test_trend_next_extrapolates_a_line_and_shrugs_off_an_outlier():
    line = [5.0 - 0.1 * t for t in range(9)]
    assert trend_next(line) == pytest.approx(5.0 - 0.1 * 9)
    line[4] += 10.0                                   # an outlier in the middle third: the line is unchanged
    assert trend_next(line) == pytest.approx(5.0 - 0.1 * 9)
    assert trend_next([3.0, 1.0]) == 2.0              # too few points for a line: their median


def test_a_jump_of_k_spreads_is_a_spike_exactly_above_the_threshold():
    """Steady state of a zigzag descent (trend 8, window 8): the expectation is the noise-free
    line, the errors are four +d and four -d, so the spread is 1.4826 * d in closed form."""
    d, n = 0.05, 40
    det = SpikeDetector(window=8, warmup=10, threshold=6.0, trend=8, min_spread=0.0)
    assert set(feed(det, zigzag(n, d=d))) == {OK}
    expected, spread = 4.0 - 0.01 * n, 1.4826 * d
    before = det.state_dict()
    kind, details = det.judge(expected + 6.1 * spread, 1.0)
    assert kind == SPIKE and details["loss_z"] == pytest.approx(6.1, abs=1e-3)
    assert details["expected"] == pytest.approx(expected) and details["spread"] == pytest.approx(spread)
    after = det.state_dict()                          # an anomaly never joins the history
    assert (after["seen"], after["losses"], after["errors"]) == (before["seen"], before["losses"], before["errors"])
    det.load_state_dict(before)
    assert det.judge(expected + 5.9 * spread, 1.0)[0] == OK
    det.load_state_dict(before)
    assert det.judge(expected - 50 * spread, 1.0)[0] == OK  # only upward deviations count


def test_right_after_a_spike_half_the_threshold_is_enough():
    det = SpikeDetector(window=8, warmup=10, threshold=6.0, trend=8, min_spread=0.0)
    feed(det, zigzag(40, d=0.05))
    expected, spread = 4.0 - 0.01 * 40, 1.4826 * 0.05
    before = det.state_dict()
    assert det.judge(expected + 3.1 * spread, 1.0)[0] == OK   # on its own: noise
    det.load_state_dict(before)
    assert det.judge(expected + 6.1 * spread, 1.0)[0] == SPIKE
    assert det.judge(expected + 3.1 * spread, 1.0)[0] == SPIKE  # right after a spike: the same bad run
    assert det.judge(expected + 2.9 * spread, 1.0)[0] == OK     # below half the bar: the run is over


def test_the_spread_is_floored_relative_to_the_level():
    """A perfectly straight loss has no spread at all; the floor min_spread * expected takes over."""
    det = SpikeDetector(window=16, warmup=10, threshold=6.0, trend=8, min_spread=0.01)
    feed(det, zigzag(30, d=0.0))
    last = 4.0 - 0.01 * 29      # the expectation is never below the latest losses ...
    expected = last - 0.01      # ... and the median one-step error (-0.01) puts it back on the line
    spread = 0.01 * last        # the floor, relative to the expectation before that correction
    before = det.state_dict()
    assert det.judge(expected + 5.9 * spread, 1.0)[0] == OK
    det.load_state_dict(before)
    kind, details = det.judge(expected + 6.1 * spread, 1.0)
    assert kind == SPIKE and details["loss_z"] == pytest.approx(6.1, abs=1e-3)


# ---------------------------------------------------------------- what must not alarm
def test_a_fast_noisy_descent_with_heavy_tailed_grad_norms_never_alarms():
    """The failure the old rule had: small-batch grad norms 10x their median with the loss on
    its trend, and an early descent of several noise sigmas per step."""
    rng = np.random.default_rng(0)
    det = SpikeDetector()
    steps = 3000
    t = np.arange(steps)
    loss = 2.0 + 3.0 * np.exp(-t / 40) + 0.5 * np.exp(-t / 800) + rng.normal(0, 0.05, steps)
    grad = np.exp(rng.standard_t(2, steps))        # heavy-tailed, with 10x-100x outliers
    grad[[350, 351, 352]] = [40.0, 30.0, 20.0]
    verdicts = [det.judge(float(x), float(g))[0] for x, g in zip(loss, grad)]
    assert verdicts.count(OK) == steps


# ---------------------------------------------------------------- warm-in, non-finite, state
def test_warm_in_judges_nothing_but_nonfinite_and_the_first_judged_step_is_warmup_plus_one():
    det = SpikeDetector(warmup=5)
    assert feed(det, zigzag(4)) == [OK] * 4
    assert det.judge(float("nan"), 1.0)[0] == NONFINITE     # non-finite is judged during warm-in too
    assert det.judge(3.9, math.inf)[0] == NONFINITE
    assert det.judge(3.9, 1.0, nonfinite=True)[0] == NONFINITE
    assert det.state_dict()["seen"] == 4                    # and never joins the history
    warm_in = det.state_dict()
    assert det.judge(100.0, 1.0)[0] == OK                   # the 5th normal step is still warm-in
    det.load_state_dict(warm_in)
    assert det.judge(zigzag(5)[-1], 1.0)[0] == OK
    assert det.judge(100.0, 1.0)[0] == SPIKE                # the 6th is judged


def test_a_resumed_detector_decides_alike():
    rng = np.random.default_rng(1)
    series = list(4.0 - 0.002 * np.arange(400) + rng.normal(0, 0.05, 400))
    series[300:303] = [s + 1.0 for s in series[300:303]]
    whole = SpikeDetector()
    verdicts = [whole.judge(x, 1.0) for x in series]
    assert [v[0] for v in verdicts[300:303]] == [SPIKE] * 3
    for stop in (250, 301):  # a resume in a quiet stretch, and one in the middle of the spikes
        first = SpikeDetector()
        feed(first, series[:stop])
        resumed = SpikeDetector()
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # plain data, as a checkpoint holds
        assert [resumed.judge(x, 1.0) for x in series[stop:]] == verdicts[stop:]


def test_from_config_uses_every_stability_setting():
    cfg = StabilityConfig(window=16, warmup=3, threshold=4.0, trend=6, min_spread=0.02)
    det = SpikeDetector.from_config(cfg)
    assert (det.window, det.warmup, det.threshold, det.trend, det.min_spread) == (16, 3, 4.0, 6, 0.02)


# ---------------------------------------------------------------- the same rule on the host (CPU runs)
@pytest.mark.parametrize("window,warmup,threshold,trend,min_spread", [
    (128, 10, 6.0, 8, 0.01), (8, 3, 4.0, 6, 0.0), (16, 1, 3.0, 2, 0.02), (5, 20, 2.5, 13, 0.001)])
def test_the_host_rule_gives_the_device_rules_verdicts_bitwise(window, warmup, threshold, trend, min_spread):
    """On random descents with noise, planted spikes of every size, NaN/inf losses and norms and
    the non-finite flag: the same verdicts, the same spike details and the same state, bitwise;
    and a state saved by one continues alike under the other."""
    rng = np.random.default_rng(window + warmup)
    device = SpikeDetector(window, warmup, threshold, trend, min_spread)
    host = HostSpikeDetector(window, warmup, threshold, trend, min_spread)
    kinds = []
    for t in range(600):
        loss, norm, flag = 5.0 - 0.004 * t + rng.normal(0, 0.03) * rng.choice([1, 5]), rng.lognormal(0, 1), False
        event = rng.random()
        if event < 0.06:
            loss += rng.choice([0.05, 0.2, 1.0, 10.0])
        elif event < 0.07:
            loss = float(rng.choice([math.nan, math.inf]))
        elif event < 0.08:
            norm = float(rng.choice([math.nan, math.inf, -math.inf]))
        elif event < 0.09:
            flag = True
        loss = float(np.float32(loss))  # a loss reaches the guard as an fp32 all-reduce
        args = (torch.tensor(loss), torch.tensor(norm, dtype=torch.float32), torch.tensor(flag))
        (code_d, details_d), (code_h, details_h) = device.verdict(*args), host.verdict(*args)
        kinds.append(KINDS[int(code_d)])
        assert int(code_h) == int(code_d), (t, loss, norm, flag)
        if kinds[-1] == SPIKE:
            assert details_h.tolist() == details_d.tolist(), t
        assert host.state_dict() == device.state_dict(), t
        if t == 300:  # each continues from the other's state (a checkpoint's plain data)
            device_state, host_state = json.loads(json.dumps(device.state_dict())), host.state_dict()
            device.load_state_dict(host_state)
            host.load_state_dict(device_state)
    assert {OK, SPIKE, NONFINITE} <= set(kinds) and kinds.count(SPIKE) >= 10, kinds


# ---------------------------------------------------------------- end to end: real bad data, real run
def test_planted_garbage_is_caught_and_the_clean_run_is_left_alone(prose_char, tmp_path):
    """Random tokens over every sample of steps 12-16, right after the default warm-up: the first
    three are judged spikes and roll back; the rest are skipped after the rollback, so no planted
    sample ever reaches an update. The same run on the clean corpus has no anomaly at all."""
    common = dict(batch__global_size=16, batch__micro_size=16, model__seq_len=32, schedule__warmup_steps=10,
                  optim__lr=1e-3, schedule__max_steps=30, checkpoint__every=5, checkpoint__keep=10, eval__batches=0)
    fit(tiny_config(prose_char, tmp_path / "clean", **common))
    assert [e for e in read_jsonl(tmp_path / "clean" / "ledger.jsonl")
            if e["event"] in ("spike", "nonfinite", "skip", "rollback", "abort")] == []

    steps = [12, 13, 14, 15, 16]
    cfg = tiny_config(prose_char, tmp_path / "planted", **common)
    planted = plant(prose_char, tmp_path / "garbage", cfg, steps)
    fit(tiny_config(str(tmp_path / "garbage"), tmp_path / "planted", **common))
    ledger = read_jsonl(tmp_path / "planted" / "ledger.jsonl")
    spikes = [e for e in ledger if e["event"] == "spike"]
    rollbacks = [e for e in ledger if e["event"] == "rollback"]
    assert [e["step"] for e in spikes[:3]] == [12, 13, 14] and len(rollbacks) == 1
    covered = [(e["start"], e["end"]) for e in spikes] + [tuple(s) for e in rollbacks for s in e["skips"]]
    for step in steps:
        for p in planted[step]["positions"]:
            assert any(a <= p < b for a, b in covered), f"planted position {p} (step {step}) reached an update"
