"""Stability: spike/NaN detection, skipped updates, rollback with a skipped data window,
abort, resume mid-episode, LR scaling and batch ramp-up, `bigtrain inspect`."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from bigtrain.checkpoint.format import committed, problem
from bigtrain.cli import main
from bigtrain.config import ConfigError
from bigtrain.inspect import inspect_step
from bigtrain.parallel.env import DistEnv
from bigtrain.stability.guard import StabilityAbort
from bigtrain.trainer import Trainer
from helpers import (REPO, bigtrain, fit, free_port, rank_env, read_jsonl, tiny_config, tiny_overrides, torchrun,
                     train_losses)

CPU = DistEnv(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
# Spikes are judged after 30 normal steps (past the fastest early descent) against the last 32;
# injected ones come at step 40 or later.
GUARD = dict(stability__window=32, stability__warmup=30)



def events(run_dir, *kinds) -> list[dict]:
    return [e for e in read_jsonl(run_dir / "ledger.jsonl") if not kinds or e["event"] in kinds]


def val_loss(run_dir) -> float:
    return [r["val_loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "val_loss" in r][-1]


# ---------------------------------------------------------------- skip, rollback, inspect

def test_spikes_are_skipped_then_rolled_back_past_and_the_run_ends_like_a_clean_one(prose_char, tmp_path):
    """Two spikes: skipped. Three in a row: one rollback to the newest checkpoint before the
    episode, and a skip window (closed form) that no later step reads (checked with inspect).
    The run ends within 2% of the clean run's val loss."""
    common = dict(model__d_model=64, model__seq_len=64, batch__global_size=16, batch__micro_size=16,
                  schedule__warmup_steps=10, schedule__max_steps=150, eval__batches=4, logging__every=5,
                  checkpoint__every=25, stability__rollback_margin=2, **GUARD)
    fit(tiny_config(prose_char, tmp_path / "clean", **common))
    spiky = fit(tiny_config(prose_char, tmp_path / "spiky", faults__spike_at=[40, 41, 80, 81, 82], **common))
    run_dir = tmp_path / "spiky"

    assert [(e["event"], e["step"]) for e in events(run_dir, "spike", "nonfinite")] == \
        [("spike", s) for s in (40, 41, 80, 81, 82)]
    assert [e["step"] for e in events(run_dir, "skip")] == [40, 41, 80, 81, 82]
    (rollback,) = events(run_dir, "rollback")
    # back to step 75 (the newest checkpoint before step 80); skip from its position to the end
    # of step 82's batch plus 2 batches: [75 * 16, (82 + 2) * 16)
    assert (rollback["step"], rollback["to_step"]) == (82, 75)
    assert rollback["skips"] == [[75 * 16, 84 * 16]]
    assert spiky.order.skips == [(75 * 16, 84 * 16)]
    assert spiky.guard.counters() == {"skipped": 5, "rollbacks": 1}
    assert abs(val_loss(run_dir) - val_loss(tmp_path / "clean")) < 0.02 * val_loss(tmp_path / "clean")

    # what step 82 read the first time is the ledger's window; the second time, data past the skip
    first, second = inspect_step(str(run_dir), 82)["attempts"]
    assert (first["start"], first["end"]) == (82 * 16 - 16, 82 * 16)
    assert first["verdict"] == "spike" and first["skipped"] and first["superseded"]
    assert not second["superseded"] and second["start"] >= 84 * 16
    seen = set()
    for step in range(76, 151):
        final = inspect_step(str(run_dir), step)["attempts"][-1]
        seen |= {s["position"] for s in final["samples"]}
    assert not seen & set(range(75 * 16, 84 * 16))
    assert final["end"] == spiky.state.position       # the replay ends where the trainer did
    assert min(seen) == 84 * 16                        # step 76 starts right after the window

    out = bigtrain(["inspect", str(run_dir), "--step", "40", "--json", "--chars", "0"])
    assert out.returncode == 0, out.stderr
    (attempt,) = json.loads(out.stdout)["attempts"]
    sample = attempt["samples"][0]
    tokens = spiky.train_split.sample(sample["sample"], 64)
    assert sample["text"] == spiky.data.tokenizer.decode(tokens.tolist())
    assert sample["sample"] == int(spiky.order.sample_at(np.array([39 * 16]))[0])
    assert main(["inspect", str(run_dir), "--step", "151"]) == 2
    with pytest.raises(ConfigError):
        inspect_step(str(tmp_path / "nowhere"), 1)


def test_resume_in_the_middle_of_an_episode_makes_the_same_decisions(prose_char, tmp_path):
    """The checkpoint at step 40 is taken one anomalous step into an episode; a run resumed
    from it still counts that step and rolls back at 42, exactly as the uninterrupted run."""
    common = dict(checkpoint__every=5, schedule__decay="constant", faults__spike_at=[40, 41, 42], **GUARD)
    fit(tiny_config(prose_char, tmp_path / "whole", schedule__max_steps=50, **common))
    fit(tiny_config(prose_char, tmp_path / "split", schedule__max_steps=40, **common))
    fit(tiny_config(prose_char, tmp_path / "split", schedule__max_steps=50, **common))

    def decisions(evs):
        return [{k: v for k, v in e.items() if k not in ("time", "checkpoint")} for e in evs]
    whole, split = events(tmp_path / "whole"), events(tmp_path / "split")
    resumed_at = next(i for i, e in enumerate(split) if e["event"] == "resume")
    assert split[resumed_at]["step"] == 40
    after = [e for e in whole if e["step"] > 40]
    assert any(e["event"] == "rollback" and e["to_step"] == 35 for e in after)
    assert decisions(split[resumed_at + 1:]) == decisions(after)   # same z-scores too: same window
    assert val_loss(tmp_path / "split") == pytest.approx(val_loss(tmp_path / "whole"), rel=1e-6)
    # inspect follows the resume and the rollback: step 42 was trained twice, as in the whole run
    for step in range(36, 51):
        a, b = inspect_step(str(tmp_path / "whole"), step), inspect_step(str(tmp_path / "split"), step)
        assert [x["samples"] for x in a["attempts"]] == [x["samples"] for x in b["attempts"]]
    attempts = inspect_step(str(tmp_path / "split"), 42)["attempts"]
    assert [(x["verdict"], x["superseded"]) for x in attempts] == [("spike", True), ("ok", False)]


def test_persistent_spikes_after_max_rollbacks_abort_with_exit_3(prose_char, tmp_path):
    args = ["train", str(REPO / "configs" / "smoke.yaml"), *tiny_overrides(
        prose_char, tmp_path, schedule__max_steps=80, checkpoint__every=10, stability__max_rollbacks=1,
        faults__spike_at=[40, 41, 42, 60, 61, 62], logging__every=10, eval__batches=0,
        stability__window=32, stability__warmup=20, stability__threshold=6.0,
        stability__skip="window")]  # what culprits a step-30 tiny model finds depends on its init
    out = bigtrain(args, env=rank_env(1))
    assert out.returncode == 3, out.stderr[-2000:]
    message = out.stderr.strip().splitlines()[-1]
    # one rollback (42 -> 30, skipping [30 * 8, 42 * 8)): the bad data of nominal steps 60-62,
    # positions [472, 496), is read by steps 48-50
    assert "aborted at step 50" in message and "[48, 49, 50]" in message, message
    assert "[472, 480), [480, 488), [488, 496)" in message and "[240, 336)" in message, message
    assert [e["event"] for e in events(tmp_path, "rollback", "abort")] == ["rollback", "abort"]
    saved = committed(tmp_path / "checkpoints")
    assert saved and all(problem(path) is None for _, path in saved)
    assert max(step for step, _ in saved) == 40   # nothing written at or after the abort


# ---------------------------------------------------------------- the guard's lifecycle

QUICK = dict(schedule__max_steps=48, eval__batches=2, **GUARD)


def train_args(data: str, run_dir, **overrides) -> list[str]:
    """``bigtrain train`` arguments for exactly ``tiny_config(data, run_dir, **overrides)``."""
    plain = run_dir.parent / "plain.yaml"
    plain.write_text("seed: 7\n")  # the tiny overrides set everything else
    return ["train", str(plain), *tiny_overrides(data, run_dir, **overrides)]


def test_retention_never_deletes_the_rollback_target(prose_char, tmp_path):
    """checkpoint.keep=2 with a checkpoint every step: steps 40 and 41 are saved during the
    episode, yet step 39, the target, is kept while the episode is open."""
    fit(tiny_config(prose_char, tmp_path, faults__spike_at=[40, 41, 42], checkpoint__every=1,
                    checkpoint__keep=2, **QUICK))
    (rollback,) = events(tmp_path, "rollback")
    assert (rollback["step"], rollback["to_step"]) == (42, 39)
    assert not events(tmp_path, "abort")
    assert [s for s, _ in committed(tmp_path / "checkpoints")] == [47, 48]  # retention as usual afterwards


def test_without_periodic_checkpoints_the_first_episode_aborts_and_says_why(prose_char, tmp_path, capsys):
    with pytest.raises(StabilityAbort, match=r"no committed checkpoint before step 40 .*set checkpoint.every"):
        fit(tiny_config(prose_char, tmp_path, faults__spike_at=[40, 41, 42], **QUICK))
    assert "checkpoint.every=0 keeps no checkpoint to roll back to" in capsys.readouterr().out
    assert json.loads((tmp_path / "ABORTED").read_text())["step"] == 42


def test_separate_episodes_each_roll_back_a_persistent_one_aborts(prose_char, tmp_path):
    """stability.max_rollbacks counts per chain: the bad data of nominal steps 90-92 is met (at
    steps 83-85) long after the replay made 32 normal steps from step 40, so it gets a rollback of
    its own; test_persistent_spikes_... shows one that comes back too soon."""
    fit(tiny_config(prose_char, tmp_path, faults__spike_at=[40, 41, 42, 90, 91, 92], checkpoint__every=5,
                    stability__max_rollbacks=1, **dict(QUICK, schedule__max_steps=90)))
    assert [(e["step"], e["to_step"], e["chain"]) for e in events(tmp_path, "rollback")] == [(42, 35, 1), (85, 80, 1)]
    assert not events(tmp_path, "abort")


@pytest.mark.slow  # real processes (torchrun); `pytest -m 'not slow'` leaves it out
def test_a_crash_right_after_a_rollback_resumes_after_it(prose_char, tmp_path):
    """kill -9 right after the rollback at step 42 (to step 38; step 40's checkpoint belongs to the
    abandoned timeline): torchrun restarts the job, which resumes from the rolled-back state,
    never reads the skipped window again, and ends exactly like the run without the crash."""
    common = dict(faults__spike_at=[40, 41, 42], checkpoint__every=2, **QUICK)
    fit(tiny_config(prose_char, tmp_path / "calm", **common))
    run = tmp_path / "crash"
    out = torchrun(1, train_args(prose_char, run, faults__crash_at=[42], **common),
                   extra=["--max-restarts", "1"])
    assert out.returncode == 0, out.stderr[-3000:]
    ledger = [e for e in events(run, "spike", "rollback", "resume") if e["step"] >= 38]
    assert [(e["event"], e["step"]) for e in ledger] == \
        [("spike", 40), ("spike", 41), ("spike", 42), ("rollback", 42), ("resume", 38)]
    window = set(range(38 * 8, 42 * 8))
    assert ledger[3]["skips"] == [[38 * 8, 42 * 8]]
    for step in range(39, 49):
        assert not {s["position"] for s in inspect_step(str(run), step)["attempts"][-1]["samples"]} & window
    assert val_loss(run) == val_loss(tmp_path / "calm")
    assert train_losses(run)[-10:] == train_losses(tmp_path / "calm")[-10:]


@pytest.mark.slow  # real processes (torchrun); `pytest -m 'not slow'` leaves it out
def test_an_abort_is_final_across_restarts(prose_char, tmp_path):
    """torchrun --max-restarts 2: the first attempt aborts at step 42, the two restarts exit 3 at
    once without training a step; a changed stability config goes on (and rolls back)."""
    common = dict(faults__spike_at=[40, 41, 42], checkpoint__every=5, **QUICK)
    out = torchrun(1, train_args(prose_char, tmp_path, stability__max_rollbacks=0, **common),
                   extra=["--max-restarts", "2"])
    assert out.returncode != 0
    assert out.stderr.count("aborted at step 42") == 3, out.stderr[-3000:]
    assert out.stderr.count(f"remove {tmp_path / 'ABORTED'} or change the config") == 2, out.stderr[-3000:]
    assert [s for s, _ in train_losses(tmp_path)] == list(range(1, 43))   # no step trained twice
    assert len(events(tmp_path, "abort")) == 1
    mark = json.loads((tmp_path / "ABORTED").read_text())
    assert mark["step"] == 42 and "max_rollbacks=0" in mark["reason"]

    fit(tiny_config(prose_char, tmp_path, stability__max_rollbacks=1, **common))
    assert [(e["step"], e["to_step"]) for e in events(tmp_path, "rollback")] == [(42, 35)]   # from step 40, mid-episode
    assert not (tmp_path / "ABORTED").exists()


def test_skipped_steps_do_not_advance_the_lr_schedule(prose_char, tmp_path):
    """Megatron semantics: max_steps counts steps (batches), the LR follows applied updates."""
    cfg = tiny_config(prose_char, tmp_path, faults__nan_at=[3, 4, 7], schedule__max_steps=10,
                      schedule__warmup_steps=3, schedule__min_lr=3e-4, eval__batches=0)
    trained = fit(cfg)
    rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 11))
    updates = 0
    for r in rows:
        base = 3e-3 * (updates + 1) / 3 if updates < 3 else \
            3e-4 + (3e-3 - 3e-4) * 0.5 * (1 + math.cos(math.pi * (updates - 3) / 7))
        assert r["lr"] == pytest.approx(base, rel=1e-12), r
        updates += r["verdict"] == "ok"
    assert (trained.state.step, trained.state.updates) == (10, 7)
    probe = Trainer(cfg.model_copy(update={"run_dir": str(tmp_path / "probe")}), CPU)
    probe.checkpointer.load(committed(tmp_path / "checkpoints")[-1][1], probe.parts())
    assert (probe.state.step, probe.state.updates) == (10, 7)
    probe.close()


# ---------------------------------------------------------------- NaN: never applied, never saved

@pytest.mark.parametrize("enabled", [True, False])  # stability.enabled=false still never applies a NaN
def test_nonfinite_step_leaves_weights_moments_and_step_count_untouched_and_never_reaches_a_checkpoint(
        prose_char, tmp_path, enabled):
    cfg = tiny_config(prose_char, tmp_path, faults__nan_at=[6, 7], schedule__max_steps=8,
                      checkpoint__every=1, checkpoint__keep=10, eval__batches=0, stability__enabled=enabled)
    fit(cfg)
    assert [(e["event"], e["step"]) for e in events(tmp_path, "nonfinite")] == [("nonfinite", 6), ("nonfinite", 7)]
    states = {}
    for step, path in committed(tmp_path / "checkpoints"):
        probe = Trainer(cfg.model_copy(update={"run_dir": str(tmp_path / f"probe{step}")}), CPU)
        probe.checkpointer.load(path, probe.parts())
        model = {k: v.clone() for k, v in probe.backend.model.state_dict().items()}
        optim = probe.backend.optimizer.state_dict()["state"]
        tensors = list(model.values()) + [t for s in optim.values() for t in s.values()]
        assert all(bool(torch.isfinite(t).all()) for t in tensors), f"non-finite value in {path}"
        states[step] = (model, optim)
        probe.close()
    for step in (6, 7):
        model, optim = states[step]
        assert all(torch.equal(model[k], states[5][0][k]) for k in model)
        for k, s in optim.items():
            assert all(torch.equal(s[n], states[5][1][k][n]) for n in s)  # moments and step count
    assert not all(torch.equal(states[8][0][k], states[5][0][k]) for k in states[5][0])


@pytest.mark.slow  # real processes (torchrun); `pytest -m 'not slow'` leaves it out
def test_two_ranks_skip_a_nan_only_rank_1_sees_roll_back_alike_and_ramp_up_like_one_process(
        prose_char, tmp_path):
    """2 ranks, gloo, one launch. A NaN written into rank 1's gradients after the all-reduce:
    rank 0 never sees it, yet both skip (none and fsdp): each rank's weights, Adam moments and
    step count equal a run that stopped one step earlier. An FSDP run with a persistent spike
    rolls back exactly as one process does; a ramp-up run has one process's losses."""
    runs = {"ramp": dict(**RAMP, schedule__scaling="sqrt", eval__batches=0),
            "rollback": dict(faults__spike_at=[40, 41, 42], checkpoint__every=10, schedule__max_steps=50,
                             eval__batches=2, stability__skip="window", optim__lr=1e-3, **GUARD)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), str(REPO / "tests" / "stability_ranks.py"), prose_char,
           str(tmp_path), json.dumps({k: dict(v, parallel__backend="fsdp") if k == "rollback" else v
                                      for k, v in runs.items()})]
    out = subprocess.run(cmd, cwd=REPO, env=rank_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    for report in reports:
        for backend in ("none", "fsdp"):
            r = report[backend]
            assert r["verdict"] == "nonfinite" and r["skipped"] == 1, (report["rank"], backend, r)
            assert r["params_equal"] and r["moments_equal"], (report["rank"], backend, r)
            assert r["adam_steps"] == [3], (report["rank"], backend, r)
        assert report["rollback"]["skips"] == [[30 * 8, 42 * 8]]
    for backend in ("none", "fsdp"):
        assert [e["step"] for e in events(tmp_path / f"{backend}-nan", "nonfinite")] == [4]

    def decisions(run_dir):
        return [(e["event"], e["step"], e.get("to_step"), e.get("skips"))
                for e in events(run_dir) if e["event"] != "resume"]
    for name, overrides in runs.items():
        single = fit(tiny_config(prose_char, tmp_path / f"{name}1", **overrides))
        one = [r["loss"] for r in read_jsonl(tmp_path / f"{name}1" / "metrics.jsonl") if "loss" in r]
        assert reports[0][name]["losses"] == pytest.approx(one, rel=1e-4), name
        assert [list(s) for s in single.order.skips] == reports[0][name]["skips"]
        assert decisions(tmp_path / f"{name}1") == decisions(tmp_path / name)
    assert ("rollback", 42, 30, [[240, 336]]) in decisions(tmp_path / "rollback")


# ---------------------------------------------------------------- LR scaling and ramp-up

# global 32, reference 16; the batch ramps 8 -> 32 by 8 over the first 96 samples
RAMP = dict(batch__global_size=32, batch__micro_size=4, batch__reference_size=16, schedule__max_steps=12,
            schedule__warmup_steps=3, schedule__decay="cosine", schedule__min_lr=3e-4, optim__lr=3e-3,
            batch__rampup={"start": 8, "increment": 8, "samples": 96})


@pytest.mark.parametrize("rule", ["sqrt", "linear"])
def test_lr_follows_the_ramped_batch_by_the_scaling_rule(prose_char, tmp_path, rule):
    fit(tiny_config(prose_char, tmp_path, schedule__scaling=rule, eval__batches=0, **RAMP))
    rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 13))
    samples = 0
    for r in rows:
        size = 32 if samples >= 96 else 8 + 8 * (samples // 32)  # 8 more every 96 / 3 samples
        n = r["step"] - 1                                           # steps before this one
        base = 3e-3 * (n + 1) / 3 if n < 3 else \
            3e-4 + (3e-3 - 3e-4) * 0.5 * (1 + math.cos(math.pi * (n - 3) / 9))
        k = size / 16
        assert r["batch_size"] == size, (r["step"], r["batch_size"], size)
        assert r["lr"] == pytest.approx(base * (k if rule == "linear" else math.sqrt(k)), rel=1e-12)
        samples += size
        assert r["samples"] == samples
    assert [r["batch_size"] for r in rows[:7]] == [8, 8, 8, 8, 16, 16, 24]
