"""Skip the culprits, not the window: bigtrain.stability.culprits, `bigtrain bisect`, inspect's marks.

Real bad data is planted on disk (bench/garbage.py: random tokens over half of the samples
that steps 40-42 of a tiny char-level run read). The run checkpoints every 10 steps, so a
window rollback to step 30 drops 96 samples for 12 bad ones.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from bigtrain.checkpoint import load_model
from bigtrain.data.order import SampleOrder
from bigtrain.inspect import inspect_step
from bigtrain.parallel.backend import build_backend
from bigtrain.parallel.env import DistEnv
from bigtrain.stability.culprits import find_culprits
from helpers import REPO, bigtrain, fit, free_port, rank_env, read_jsonl, tiny_config

sys.path.insert(0, str(REPO))  # bench/ holds scripts, not an installed package
from bench.garbage import plant  # noqa: E402

BAD_STEPS, B = [40, 41, 42], 8
RUN = dict(checkpoint__every=10, checkpoint__keep=10, schedule__max_steps=50, stability__window=32,
           stability__warmup=20, eval__batches=0)
CPU = DistEnv(rank=0, world=1, local_rank=0, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def runs(prose_char, tmp_path_factory):
    root = tmp_path_factory.mktemp("culprits")
    planted = plant(prose_char, root / "planted", tiny_config(prose_char, root / "x", **RUN),
                    BAD_STEPS, fraction=0.5, seed=1)
    data = str(root / "planted")
    trained = {name: fit(tiny_config(data, root / name, **{**RUN, **extra})) for name, extra in
               {"culprits": {}, "window": dict(stability__skip="window"),
                "unguarded": dict(stability__enabled=False, schedule__max_steps=40)}.items()}
    return {"root": root, "data": data, "trained": trained,
            "planted": sorted(p for v in planted.values() for p in v["positions"])}


def episode(runs, steps):
    """The global batches ``steps`` read in a run without skips: (positions, samples)."""
    cfg = runs["trained"]["culprits"].cfg
    order = SampleOrder(runs["trained"]["culprits"].train_split.num_samples(cfg.model.seq_len), cfg.seed)
    return [(np.arange((s - 1) * B, s * B), order.sample_at(np.arange((s - 1) * B, s * B))) for s in steps]


def culprits_at(runs, checkpoint_step, steps):
    run = runs["trained"]["culprits"]
    backend = build_backend(load_model(run.run_dir, checkpoint_step), run.cfg, CPU)
    return find_culprits(backend, CPU, run.train_split, run.cfg.model.seq_len, run.cfg.batch.micro_size,
                         episode(runs, steps))


def test_find_culprits_names_exactly_the_planted_samples_and_none_in_clean_batches(runs):
    found = culprits_at(runs, 30, BAD_STEPS)
    assert found is not None and found.positions == runs["planted"]
    assert min(found.scores) > found.median + 1.0
    for checkpoint, steps in [(10, [11, 12, 13]), (20, [21, 22, 23]), (30, [31, 32, 33]), (30, [31])]:
        assert culprits_at(runs, checkpoint, steps) is None, (checkpoint, steps)


def test_a_rollback_skips_only_the_culprits_and_the_window_policy_still_skips_the_window(runs):
    culprit_run, window_run = runs["trained"]["culprits"], runs["trained"]["window"]
    events = read_jsonl(culprit_run.run_dir / "ledger.jsonl")
    rollback = [e for e in events if e["event"] == "rollback"]
    assert [(e["step"], e["to_step"]) for e in rollback] == [(42, 30)]
    assert [e["positions"] for e in events if e["event"] == "culprits"] == [runs["planted"]]
    skipped = [p for a, b in culprit_run.order.skips for p in range(a, b)]
    assert skipped == runs["planted"]
    assert window_run.order.skips == [(30 * B, 42 * B)]
    assert not [e for e in read_jsonl(window_run.run_dir / "ledger.jsonl") if e["event"] == "culprits"]
    # the culprit run read every clean sample of the episode: 12 skipped, so 50 steps end 12 later
    assert culprit_run.state.position == 50 * B + len(runs["planted"])


@pytest.mark.slow  # real processes (torchrun); `pytest -m 'not slow'` leaves it out
def test_two_fsdp_ranks_find_what_one_process_finds(runs, tmp_path):
    batches = json.dumps([p.tolist() for p, _ in episode(runs, BAD_STEPS)])
    run_dir = str(runs["trained"]["culprits"].run_dir)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), str(REPO / "tests" / "culprits_ranks.py"), run_dir, "30",
           str(tmp_path), batches]
    out = subprocess.run(cmd, cwd=REPO, env=rank_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    one = culprits_at(runs, 30, BAD_STEPS)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank-{rank}.json").read_text())
        assert got["positions"] == one.positions == runs["planted"]
        np.testing.assert_allclose(got["scores"], one.scores, rtol=1e-5)


def test_bisect_prints_the_planted_samples_of_a_step(runs):
    run_dir = str(runs["trained"]["unguarded"].run_dir)
    out = bigtrain(["bisect", run_dir, "--step", "40", "--json"])
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    planted = [p for p in runs["planted"] if 39 * B <= p < 40 * B]
    assert report["checkpoint_step"] == 30 and report["culprits"] == planted
    assert [r["position"] for r in report["samples"] if r["culprit"]] == planted
    text = bigtrain(["bisect", run_dir, "--step", "40"]).stdout
    for row in report["samples"]:
        assert (json.dumps(row["text"]) in text) == row["culprit"]
    bad = bigtrain(["bisect", run_dir, "--step", "5"])
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "before step 5" in bad.stderr


def test_inspect_marks_skipped_culprits_and_shows_what_the_step_read_instead(runs):
    run = runs["trained"]["culprits"]
    first, second = inspect_step(str(run.run_dir), 41)["attempts"]
    marked = [r["position"] for r in first["samples"] if r["culprit"] is not None]
    assert marked == [p for p in runs["planted"] if 40 * B <= p < 41 * B]
    assert first["superseded"] and first["verdict"] == "spike"
    read = [r["position"] for r in second["samples"]]
    assert not set(read) & set(runs["planted"]) and len(read) == B
    assert all(r["culprit"] is None for r in second["samples"])
    # the replay ends where the trainer did
    assert inspect_step(str(run.run_dir), 50)["attempts"][-1]["end"] == run.state.position
    out = bigtrain(["inspect", str(run.run_dir), "--step", "41"]).stdout
    assert out.count("CULPRIT, skipped") == len(marked)


def test_many_single_skipped_positions_merge_and_batches_step_over_them():
    rng = np.random.default_rng(0)
    singles = rng.choice(20_000, size=5_000, replace=False)
    order = SampleOrder(1000, 0)
    for p in singles:
        order.add_skip(p, p + 1)
    starts, ends = zip(*order.skips)
    assert all(e < s for e, s in zip(ends, starts[1:]))  # sorted, disjoint, touching ones merged
    assert sum(e - s for s, e in order.skips) == len(singles)
    free = np.setdiff1d(np.arange(30_000), singles)
    got, position = [], 0
    while len(got) < 15_000:
        batch, position = order.next_batch(position, 64)
        got.extend(batch.tolist())
    assert got[:15_000] == free[:15_000].tolist()


def test_inspect_replay_keeps_every_skip_across_rollbacks_to_the_same_checkpoint(tmp_path):
    """The guard re-applies every earlier rollback's skips after loading an older checkpoint;
    the replay must too, or a second rollback to step 20 would forget the first one's culprits."""
    from bigtrain.inspect import Replay
    replay = Replay(10_000, tiny_config("unused", tmp_path), target=21)
    for event in [{"event": "culprits", "step": 30, "positions": [160, 163], "scores": [9.0, 9.0]},
                  {"event": "rollback", "step": 30, "to_step": 20, "skips": [[160, 161], [163, 164]]},
                  {"event": "rollback", "step": 25, "to_step": 20, "skips": [[164, 200]]}]:
        replay.apply(event)
    replay.advance(21)
    assert [a.positions for a in replay.attempts] == [list(range(160, 168)), [161, 162, 164, 165, 166, 167, 168, 169],
                                                      [161, 162] + list(range(200, 206))]
