"""The stability guard alone: verdicts in, decisions and ledger lines out (no model, no trainer)."""
from __future__ import annotations

import pytest
import torch

from bigtrain.config import StabilityConfig
from bigtrain.ledger import Ledger
from bigtrain.parallel.env import DistEnv
from bigtrain.stability.guard import ABORT, GO_ON, ROLLBACK, Guard

CPU = DistEnv(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
BATCH = 8


def make_guard(tmp_path, **cfg) -> Guard:
    tmp_path.mkdir(parents=True, exist_ok=True)
    return Guard(StabilityConfig(**{"window": 4, "warmup": 2, **cfg}), CPU, Ledger(tmp_path, True))


def step(guard: Guard, n: int, bad: bool = False, position: int | None = None):
    """Step ``n`` (read ``[position, position + BATCH)``, default the nominal window): a NaN
    when ``bad``, else a loss of 1.0; returns the guard's decision."""
    start = (n - 1) * BATCH if position is None else position
    guard.judge(1.0, 1.0, bad)
    return guard.after_step(n, start, start + BATCH, BATCH)


def lines(guard: Guard) -> list[tuple]:
    return [(e["event"], e["step"]) for e in guard.ledger.events()]


def rolled_back(guard: Guard, decision, to_step: int, state_at_target: dict) -> None:
    """What the loop does around a rollback: remember, reload the target's guard state, record."""
    memory = guard.state_dict()
    guard.load_state_dict(state_at_target)
    guard.rolled_back(memory, decision, to_step, [(to_step * BATCH, decision.episode[-1]["end"])])


def test_normal_steps_go_on_and_record_nothing(tmp_path):
    guard = make_guard(tmp_path)
    assert all(step(guard, n).action == GO_ON for n in range(1, 10))
    assert lines(guard) == [] and guard.counters() == {"skipped": 0, "rollbacks": 0}
    assert guard.open_since is None


def test_an_episode_of_max_consecutive_steps_asks_for_a_rollback_with_its_windows(tmp_path):
    guard = make_guard(tmp_path, max_consecutive=3)
    for n in range(1, 6):
        step(guard, n)
    assert step(guard, 6, bad=True).action == GO_ON      # skipped, not applied
    assert step(guard, 7).action == GO_ON                # a normal step closes the episode
    assert guard.open_since is None
    assert [step(guard, n, bad=True).action for n in (8, 9)] == [GO_ON, GO_ON]
    assert guard.open_since == 8
    decision = step(guard, 10, bad=True)
    assert decision.action == ROLLBACK and decision.first_step == 8
    assert [(e["step"], e["start"], e["end"], e["size"]) for e in decision.episode] == \
        [(n, (n - 1) * BATCH, n * BATCH, BATCH) for n in (8, 9, 10)]
    assert lines(guard) == [(kind, n) for n in (6, 8, 9, 10) for kind in ("nonfinite", "skip")]
    assert guard.counters() == {"skipped": 4, "rollbacks": 0}


def test_a_rollback_keeps_what_the_run_learnt_and_restores_the_rest(tmp_path):
    guard = make_guard(tmp_path, max_consecutive=2)
    for n in range(1, 5):
        step(guard, n)
    at_step_4 = guard.state_dict()
    step(guard, 5, bad=True)
    decision = step(guard, 6, bad=True)
    assert decision.action == ROLLBACK
    rolled_back(guard, decision, 4, at_step_4)
    assert guard.counters() == {"skipped": 2, "rollbacks": 1}   # the abandoned timeline's skips still count
    assert guard.open_since is None                             # the episode was the abandoned timeline's
    after = guard.state_dict()
    assert after["detector"] == at_step_4["detector"]           # the window belongs to the restored model
    assert after["rollbacks"] == [{"step": 6, "to_step": 4, "skips": [[32, 48]]}]


def test_max_rollbacks_counts_per_chain(tmp_path):
    """A rollback belongs to the chain until the replay has made ``window`` (4) normal steps
    numbered from the chain's first episode (step 5); then the chain ends and the count restarts."""
    guard = make_guard(tmp_path, max_consecutive=2, max_rollbacks=1)
    for n in range(1, 5):
        step(guard, n)
    at_step_4 = guard.state_dict()
    step(guard, 5, bad=True)
    rolled_back(guard, step(guard, 6, bad=True), 4, at_step_4)
    # the replay: steps 5-7 normal (3 < 4 from step 5), then the trouble comes back
    for n in (5, 6, 7):
        step(guard, n, position=100 + n * BATCH)
    step(guard, 8, bad=True)
    decision = step(guard, 9, bad=True)
    assert decision.action == ABORT
    assert "1 rollback(s) in a row" in decision.reason and "max_rollbacks=1" in decision.reason

    guard = make_guard(tmp_path / "far", max_consecutive=2, max_rollbacks=1)
    for n in range(1, 5):
        step(guard, n)
    at_step_4 = guard.state_dict()
    step(guard, 5, bad=True)
    rolled_back(guard, step(guard, 6, bad=True), 4, at_step_4)
    for n in range(5, 9):                                 # 4 normal steps from step 5: the chain ends
        step(guard, n)
    step(guard, 20, bad=True)
    assert step(guard, 21, bad=True).action == ROLLBACK
    assert guard.counters()["rollbacks"] == 1


def test_max_rollbacks_0_aborts_the_first_episode(tmp_path):
    guard = make_guard(tmp_path, max_consecutive=1, max_rollbacks=0)
    step(guard, 1)
    decision = step(guard, 2, bad=True)
    assert decision.action == ABORT
    error = guard.abort(2, decision, decision.reason)
    assert error.exit_code == 3
    message = str(error)
    assert "aborted at step 2" in message and "[2]" in message and "[8, 16)" in message, message
    assert f"bigtrain inspect {tmp_path} --step N" in message
    abort = guard.ledger.events()[-1]
    assert (abort["event"], abort["step"], abort["steps"], abort["ranges"]) == ("abort", 2, [2], [[8, 16]])


def test_a_guard_restored_mid_episode_decides_like_the_uninterrupted_one(tmp_path):
    whole = make_guard(tmp_path / "whole", max_consecutive=3)
    for n in range(1, 6):
        step(whole, n, bad=n == 5)
    saved = whole.state_dict()
    resumed = make_guard(tmp_path / "resumed", max_consecutive=3)
    resumed.load_state_dict(saved)
    assert resumed.open_since == whole.open_since == 5
    for guard in (whole, resumed):
        step(guard, 6, bad=True)
    a, b = step(whole, 7, bad=True), step(resumed, 7, bad=True)
    assert a == b and a.action == ROLLBACK and a.first_step == 5
    assert whole.state_dict() == resumed.state_dict()


@pytest.mark.parametrize("bad", [True, False])
def test_disabled_guard_skips_a_nan_but_never_rolls_back(tmp_path, bad):
    guard = make_guard(tmp_path, enabled=False, max_consecutive=1)
    guard.judge(1e9 if not bad else 1.0, 1.0, bad)   # no spike detection: a huge loss is applied
    assert guard.last.read().apply is not bad
    assert guard.after_step(1, 0, BATCH, BATCH).action == GO_ON
    assert lines(guard) == ([("nonfinite", 1), ("skip", 1)] if bad else [])
    assert guard.open_since is None
