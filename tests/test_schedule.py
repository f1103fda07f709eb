"""The warmup-stable-decay schedule and `bigtrain anneal`.

The LR is checked against the closed form written out here (not against ``lr_at``), in a real
run as logged in metrics.jsonl; an anneal against itself run twice and against the stable run
it starts from.
"""
from __future__ import annotations

import math

import pytest
import torch

from bigtrain.checkpoint import load_model
from bigtrain.cli import main
from bigtrain.config import ConfigError, load_config
from bigtrain.optim import base_lr
from helpers import fit, read_jsonl, tiny_config, train_losses

PEAK, FLOOR = 3e-3, 3e-4


def wsd(update: int, warmup: int, start: int, length: int, shape: str) -> float:
    """The closed form: linear warmup, the peak, then the shape down to the floor."""
    if update < warmup:
        return PEAK * (update + 1) / warmup
    p = min(1.0, max(0, update - start) / length)
    left = {"linear": 1 - p, "cosine": (1 + math.cos(math.pi * p)) / 2, "1-sqrt": 1 - math.sqrt(p)}[shape]
    return FLOOR + (PEAK - FLOOR) * left


def logged_lr(run_dir) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in read_jsonl(run_dir / "metrics.jsonl") if "lr" in r}


@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt"])
@pytest.mark.parametrize("length", [{"decay_steps": 5}, {"decay_fraction": 0.25}])
def test_wsd_is_the_closed_form(shape, length):
    extra = [f"schedule.{k}={v}" for k, v in length.items()]
    cfg = load_config(overrides=["optim.lr=3e-3", "schedule.min_lr=3e-4", "schedule.decay=wsd", "schedule.warmup_steps=3",
                                 "schedule.max_steps=20", f"schedule.decay_shape={shape}", *extra])
    n = 5 if "decay_steps" in length else round(0.25 * 20)
    for u in range(25):
        assert base_lr(u, cfg) == pytest.approx(wsd(u, 3, 20 - n, n, shape), rel=1e-12), u
    assert base_lr(20 - n - 1, cfg) == PEAK and base_lr(20, cfg) == pytest.approx(FLOOR)


@pytest.mark.parametrize("overrides, needle", [
    (["schedule.decay=wsd"], "decay=wsd needs exactly one of decay_steps and decay_fraction"),
    (["schedule.decay=wsd", "schedule.decay_steps=3", "schedule.decay_fraction=0.1"], "exactly one of"),
    (["schedule.decay=wsd", "schedule.decay_steps=99", "schedule.max_steps=100", "schedule.warmup_steps=5"],
     "does not fit after warmup_steps=5"),
    (["schedule.decay=wsd", "schedule.decay_steps=3", "schedule.decay_start=2", "schedule.warmup_steps=5"],
     "decay_start=2 is inside the warmup"),
    (["schedule.decay=wsd", "schedule.decay_steps=30", "schedule.decay_start=80"], "ends after max_steps=100"),
    (["schedule.decay_shape=sqrt"], "schedule.decay_shape = 'sqrt'"),
])
def test_bad_wsd_settings_are_one_line(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=overrides)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_logged_lr_is_the_closed_form_and_a_skipped_step_does_not_advance_it(prose_bytes, tmp_path):
    fit(tiny_config(prose_bytes, tmp_path, schedule__decay="wsd", schedule__decay_steps=5, schedule__max_steps=12,
                    schedule__min_lr=FLOOR, faults__nan_at=[9]))
    updates_before = {s: s - 1 if s <= 9 else s - 2 for s in range(1, 13)}  # step 9 is skipped
    expected = {s: wsd(u, 2, 7, 5, "1-sqrt") for s, u in updates_before.items()}
    assert logged_lr(tmp_path) == pytest.approx(expected, rel=1e-12, abs=0)
    assert logged_lr(tmp_path)[10] == logged_lr(tmp_path)[9]


@pytest.fixture(scope="module")
def stable_run(prose_bytes, tmp_path_factory):
    """A WSD run whose stable phase lasts to update 16 (of 20), with an EMA; checkpoints every 4."""
    run = tmp_path_factory.mktemp("wsd") / "stable"
    fit(tiny_config(prose_bytes, run, model__dropout=0.1, schedule__decay="wsd", schedule__decay_steps=4,
                    schedule__max_steps=20, schedule__min_lr=FLOOR, checkpoint__every=4, checkpoint__keep=5,
                    ema__decay=0.9))
    return run


def test_anneal_from_a_stable_checkpoint_is_reproducible_and_follows_the_closed_form(stable_run, tmp_path, capsys):
    first, again = tmp_path / "first", tmp_path / "again"
    args = [str(stable_run), "--step", "8", "--decay-steps", "4", "schedule.decay_shape=linear"]
    assert main(["anneal", *args, "--out", str(first)]) == 0
    # the same anneal as a config for `bigtrain train` (what `bigtrain launch` and sbatch take)
    capsys.readouterr()
    assert main(["anneal", *args, "--out", str(again), "--print-config"]) == 0
    (tmp_path / "anneal.yaml").write_text(capsys.readouterr().out)
    assert main(["train", str(tmp_path / "anneal.yaml")]) == 0

    assert train_losses(first) == train_losses(again) and [s for s, _ in train_losses(first)] == [9, 10, 11, 12]
    assert torch.equal(*(torch.cat([p.flatten() for p in load_model(r).parameters()]) for r in (first, again)))
    # the decay starts at the resumed step: linear from the peak, over 4 updates
    assert logged_lr(first) == pytest.approx({9 + i: wsd(8 + i, 2, 8, 4, "linear") for i in range(4)}, rel=1e-12)
    # it starts where the stable run was: the same weights, optimizer and batch give the same step-9 loss
    assert dict(train_losses(first))[9] == dict(train_losses(stable_run))[9]
    (event,) = read_jsonl(first / "ledger.jsonl")
    assert event["event"] == "resume" and event["step"] == 8
    # the same command again resumes the finished anneal (nothing to do); another schedule there is refused
    assert main(["anneal", *args, "--out", str(first)]) == 0 and len(train_losses(first)) == 4
    capsys.readouterr()
    assert main(["anneal", *args[:-2], "3", "--out", str(first)]) == 2
    err = capsys.readouterr().err.strip()
    assert "already holds an anneal with schedule" in err and "\n" not in err


def test_anneal_refuses_a_checkpoint_past_the_stable_phase_in_one_line(stable_run, tmp_path, capsys):
    for args, needle in [(["--step", "20", "--out", str(tmp_path / "late")], "and the anneal would start at"),
                         (["--step", "8", "--out", str(stable_run)], "is the source run")]:
        assert main(["anneal", str(stable_run), "--decay-steps", "2", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and "\n" not in err, err
    assert not (tmp_path / "late").exists()
