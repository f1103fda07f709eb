"""Weighted mixtures of sources (issue 13, items 1 and 2): bigtrain.data.mixture, the order's
weight history, per-source loss and eval, `bigtrain inspect` naming sources, and changing the
weights when resuming. The sources are two parts of the stdlib docstring corpus (tests/corpus.py)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from bigtrain.cli import main
from bigtrain.config import ConfigError
from bigtrain.data.mixture import Interleave, integer_weights
from bigtrain.data.order import SampleOrder, permutation
from bigtrain.inspect import inspect_step
from helpers import REPO, bigtrain, fit, read_jsonl, tiny_overrides, torchrun

SMOKE = str(REPO / "configs" / "smoke.yaml")
TINY = dict(model__n_layer=1, model__d_model=32, eval__batches=1, schedule__decay="constant")


@pytest.fixture(scope="session")
def sources(docs_text, tmp_path_factory) -> tuple[str, str]:
    """The first 60% and the last 40% of the corpus, each prepared alone (byte tokenizer)."""
    from bigtrain.data.prepare import prepare
    root = tmp_path_factory.mktemp("mixture")
    cut = int(len(docs_text) * 0.6)
    out = []
    for name, text in (("web", docs_text[:cut]), ("code", docs_text[cut:])):
        (root / f"{name}.txt").write_text(text)
        prepare(str(root / f"{name}.txt"), "bytes", str(root / name), val_fraction=0.0)
        out.append(str(root / name))
    return tuple(out)


def mixed(sources, weights=(0.7, 0.3)) -> str:
    return "data.sources=" + json.dumps([{"path": p, "weight": w} for p, w in zip(sources, weights)])


def mix_config(sources, run_dir, weights=(0.7, 0.3), **extra):
    from bigtrain.config import load_config
    return load_config(overrides=tiny_overrides(sources[0], run_dir, **{**TINY, **extra}) + [mixed(sources, weights)])


def metrics(run_dir) -> list[dict]:
    return [r for r in read_jsonl(Path(run_dir) / "metrics.jsonl") if "loss" in r]


# ---------------------------------------------------------------- the interleaving, in closed form

@settings(max_examples=60, deadline=None)
@given(weights=st.lists(st.integers(0, 12), min_size=1, max_size=6).filter(any),
       start=st.integers(0, 10**9), n=st.integers(1, 600))
def test_every_window_holds_each_source_at_its_weight(weights, start, n):
    """Any window of n positions holds n * w_s draws of source s, within one per tree level; the
    draw numbers count each source's earlier draws; counts() agrees with draw()."""
    mix = Interleave(weights)
    source, k = mix.draw(np.arange(start, start + n))
    levels = math.ceil(math.log2(len(weights))) if len(weights) > 1 else 0
    got = np.bincount(source, minlength=len(weights))
    assert np.all(np.abs(got - n * np.array(weights) / sum(weights)) <= max(levels, 1e-9))
    before = mix.counts(start)
    for s in range(len(weights)):
        assert k[source == s].tolist() == list(range(before[s], before[s] + got[s]))
    assert [b + g for b, g in zip(before, got.tolist())] == mix.counts(start + n)


def test_integer_weights_are_the_exact_proportions():
    assert integer_weights([0.7, 0.3]) == [7, 3]
    assert integer_weights([2, 2, 0]) == [1, 1, 0]
    assert Interleave([7, 3]).counts(10) == [7, 3]
    odd = integer_weights([math.pi, 1.0])
    assert abs(odd[0] / sum(odd) - math.pi / (math.pi + 1)) < 1e-6
    for bad in ([0, 0], [1, -1]):
        with pytest.raises(ValueError):
            integer_weights(bad)


def test_each_source_walks_its_own_epochs_without_disturbing_the_others():
    """A 5-sample source is read 40 times: eight epochs, each a permutation of its own;
    the big source reads exactly what it reads next to a source of another size."""
    small = SampleOrder([5, 1000], seed=3, weights=[1, 1])
    other = SampleOrder([7, 1000], seed=3, weights=[1, 1])
    pos = np.arange(80)
    a, b = small.sample_at(pos), other.sample_at(pos)
    assert a[::2].tolist() == np.concatenate([permutation(5, 3, e) for e in range(8)]).tolist()
    assert (a[1::2] - 5).tolist() == (b[1::2] - 7).tolist() == permutation(1000, 3, 0)[:40].tolist()
    assert small.source_of(a).tolist() == [0, 1] * 40


# ---------------------------------------------------------------- the weight history, unit level

def _order(sizes=(300, 200), weights=(0.7, 0.3), seed=5, position=None, sha=("a", "b")):
    fp = {"seq_len": 8, "sources": [{"name": f"s{i}", "train_sha256": h, "val_fraction": 0.0, "samples": n}
                                    for i, (h, n) in enumerate(zip(sha, sizes))]}
    return SampleOrder(list(sizes), seed, fingerprint=fp, weights=list(weights), position=position)


def test_other_weights_start_a_segment_at_the_resumed_position():
    before = _order()
    state = before.state_dict()
    seen = []
    after = _order(weights=(0.2, 0.8), position=lambda: 400)
    after.on_change = seen.append
    after.load_state_dict(state)
    assert [s["start"] for s in after.state_dict()["mixture"]] == [0, 400]
    assert seen[0]["draws"] == Interleave([7, 3]).counts(400) == [280, 120]
    early, late = np.arange(400), np.arange(400, 900)
    assert after.sample_at(early).tolist() == before.sample_at(early).tolist()  # the past is unchanged
    src, k = after.mixture.draw(late)
    assert np.bincount(src).tolist() == [100, 400] and k[src == 0][0] == 280 and k[src == 1][0] == 120
    again = _order(weights=(0.2, 0.8))   # resuming the changed state: the same stream, no new segment
    again.on_change = seen.append
    again.load_state_dict(after.state_dict())
    assert again.sample_at(np.arange(900)).tolist() == after.sample_at(np.arange(900)).tolist()
    assert len(seen) == 1


@pytest.mark.parametrize("change, needle", [
    (dict(seed=6), "seed 5, this run has seed 6"),
    (dict(sha=("a", "c")),
     "train shards sha256 b... for data.sources[1] ('s1'), this run has train shards sha256 c..."),
    (dict(sizes=(300,), weights=(1,), sha=("a",)), "2 data sources, this run has 1"),
])
def test_a_change_of_the_data_or_the_seed_is_refused(change, needle):
    with pytest.raises(ConfigError, match=None) as e:
        _order(**change, position=lambda: 0).load_state_dict(_order().state_dict())
    assert needle in str(e.value) and "accept_data_change" in str(e.value)


def test_a_source_added_to_a_one_source_run_starts_a_segment():
    """Annealing onto a run that read one prepared dir (the legacy flat state) with a second source."""
    legacy = SampleOrder(300, 5, fingerprint={"seq_len": 8, "train_sha256": "a", "val_fraction": 0.0})
    assert "mixture" not in legacy.state_dict()   # a one-source run's state is what it always was
    after = _order(sizes=(300, 200), weights=(0.5, 0.5), position=lambda: 1000)
    after.load_state_dict(legacy.state_dict())
    assert after.mixture.history() == [{"start": 0, "weights": [1], "draws": [0]},
                                       {"start": 1000, "weights": [1, 1], "draws": [1000, 0]}]
    assert after.sample_at(np.arange(1000)).tolist() == legacy.sample_at(np.arange(1000)).tolist()
    assert after.sample_at(np.array([1000, 1001])).tolist() == \
        [legacy.sample_at(np.array([1000]))[0], 300 + permutation(200, 5, 0)[0]]


# ---------------------------------------------------------------- runs

def test_two_sources_keep_their_weights_in_every_window_of_50_steps(sources, tmp_path):
    """0.7 / 0.3 over 200 steps, counted from `bigtrain inspect`: within 3 points in every window
    of 50 steps; per-source loss and eval in metrics.jsonl; the one-source run is untouched."""
    run = fit(mix_config(sources, tmp_path, schedule__max_steps=200, logging__every=50))
    names = []
    for step in range(1, 201):
        (attempt,) = inspect_step(str(tmp_path), step, chars=0)["attempts"]
        names += [row["source"] for row in attempt["samples"]]
    per_step = 8
    for w in range(0, 200, 50):
        window = names[w * per_step:(w + 50) * per_step]
        assert abs(window.count("web") / len(window) - 0.7) <= 0.03
        assert abs(window.count("code") / len(window) - 0.3) <= 0.03

    out = bigtrain(["inspect", str(tmp_path), "--step", "200", "--json", "--chars", "0"])
    assert out.returncode == 0, out.stderr
    (attempt,) = json.loads(out.stdout)["attempts"]
    for row in attempt["samples"]:
        tokens = run.train_split.sample(row["sample"], 32)
        assert row["text"] == run.data.tokenizer.decode(tokens.tolist())
        assert run.train_split.names[run.order.source_of([row["sample"]])[0]] == row["source"]
    text = bigtrain(["inspect", str(tmp_path), "--step", "200"]).stdout
    assert " web draw " in text and " code draw " in text

    logged = metrics(tmp_path)
    assert [r["step"] for r in logged] == [50, 100, 150, 200]
    assert all(set(r) >= {"loss/web", "loss/code"} for r in logged)
    (ev,) = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "val_loss" in r]
    assert ev["val_loss"] == pytest.approx(0.7 * ev["val_loss/web"] + 0.3 * ev["val_loss/code"])


def test_per_source_loss_is_each_sources_token_mean_cross_entropy(sources, tmp_path):
    """Closed form: step 1's loss/<name> is the mean CE, under the initial model, of the step's
    samples from that source; the step's loss is the token-weighted mean of both. TensorBoard
    has them too, and the eval's per-source losses."""
    from bigtrain.model.gpt import GPT
    from bigtrain.parallel.env import seed_everything
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    cfg = mix_config(sources, tmp_path, schedule__max_steps=1, logging__tensorboard=True)
    seed_everything(cfg.seed)
    model = GPT(cfg.model)   # what the trainer builds before its first update
    run = fit(cfg)
    (record,) = metrics(tmp_path)
    positions, _ = run.order.next_batch(0, 8)
    samples = run.order.sample_at(positions)
    rows = torch.from_numpy(run.train_split.batch(samples, 32))
    with torch.no_grad():
        ce = F.cross_entropy(model(rows[:, :-1]).transpose(1, 2), rows[:, 1:], reduction="none").mean(1)
    source = run.order.source_of(samples)
    for i, name in enumerate(["web", "code"]):
        assert record[f"loss/{name}"] == pytest.approx(float(ce[source == i].mean()), rel=1e-5)
    assert record["loss"] == pytest.approx(float(ce.mean()), rel=1e-5)
    board = EventAccumulator(str(tmp_path / "tb"))
    board.Reload()
    for tag in ("train/loss/web", "train/loss/code", "eval/val_loss/web", "eval/val_loss/code"):
        (event,) = board.Scalars(tag)
        assert event.step == 1
    assert board.Scalars("train/loss/code")[0].value == pytest.approx(record["loss/code"])


def test_resume_is_exact_and_a_rollback_skips_across_both_sources(sources, tmp_path):
    """Stopped at step 30 and resumed: the same losses, per source too, as without the stop.
    Spikes at 40-42 roll back to step 35 and skip the window: draws of both sources that no
    later step reads, while each source goes on from its own draw count."""
    guard = dict(stability__window=32, stability__warmup=30, stability__skip="window",
                 checkpoint__every=5, schedule__max_steps=60, faults__spike_at=[40, 41, 42])
    whole = fit(mix_config(sources, tmp_path / "whole", **guard))
    fit(mix_config(sources, tmp_path / "split", **{**guard, "schedule__max_steps": 30}))
    split = fit(mix_config(sources, tmp_path / "split", **guard))
    pick = ("step", "loss", "loss/web", "loss/code")
    assert [[r[k] for k in pick] for r in metrics(tmp_path / "whole")] == \
        [[r[k] for k in pick] for r in metrics(tmp_path / "split")]
    assert split.order.skips == whole.order.skips == [(35 * 8, 42 * 8)]

    read, skipped = set(), set()
    for step in range(36, 61):
        *old, final = inspect_step(str(tmp_path / "whole"), step)["attempts"]
        read |= {(r["source"], r["draw"]) for r in final["samples"]}
        skipped |= {(r["source"], r["draw"]) for a in old for r in a["samples"]}
    assert {s for s, _ in skipped} == {"web", "code"} and not read & skipped
    first = inspect_step(str(tmp_path / "whole"), 36)["attempts"][-1]["samples"]
    draws = whole.order.mixture.draws_before(42 * 8)
    assert {r["source"]: r["draw"] for r in reversed(first)} == {"web": draws[0], "code": draws[1]}


def test_weights_change_when_resuming_and_the_stream_stays_inspectable(sources, tmp_path, capsys):
    """0.7/0.3 to step 20, then 0.2/0.8 (an annealing stage): a `mixture` event, inspect shows
    each stage with its weights; a resume past the change reads what an unbroken run reads.
    Another source file or seed is refused with one line."""
    fit(mix_config(sources, tmp_path / "a", schedule__max_steps=20, checkpoint__every=10))
    after = fit(mix_config(sources, tmp_path / "a", (0.2, 0.8), schedule__max_steps=40, checkpoint__every=10))
    (event,) = [e for e in read_jsonl(tmp_path / "a" / "ledger.jsonl") if e["event"] == "mixture"]
    assert (event["step"], event["start"], event["weights"], event["draws"]) == (20, 160, [1, 4], [112, 48])

    def fraction(step_range):
        names = [r["source"] for s in step_range
                 for r in inspect_step(str(tmp_path / "a"), s)["attempts"][-1]["samples"]]
        return names.count("web") / len(names)
    assert fraction(range(1, 21)) == pytest.approx(0.7, abs=0.01)
    assert fraction(range(21, 41)) == pytest.approx(0.2, abs=0.01)
    last = inspect_step(str(tmp_path / "a"), 40)["attempts"][-1]
    assert last["end"] == after.state.position
    assert [r["sample"] for r in last["samples"]] == after.order.sample_at(np.arange(312, 320)).tolist()

    # the same change, then a stop at 30 and a resume: the stream past the change is the same
    fit(mix_config(sources, tmp_path / "b", schedule__max_steps=20, checkpoint__every=10))
    fit(mix_config(sources, tmp_path / "b", (0.2, 0.8), schedule__max_steps=30, checkpoint__every=10))
    fit(mix_config(sources, tmp_path / "b", (0.2, 0.8), schedule__max_steps=40, checkpoint__every=10))
    assert [r["loss"] for r in metrics(tmp_path / "b")] == [r["loss"] for r in metrics(tmp_path / "a")]

    other_code = "data.sources=" + json.dumps([{"path": sources[0], "weight": 0.2},
                                               {"path": sources[0], "weight": 0.8, "name": "code"}])
    for change in (["seed=8"], [other_code]):
        capsys.readouterr()
        argv = ["train", SMOKE, *tiny_overrides(sources[0], tmp_path / "a", schedule__max_steps=50, **TINY),
                mixed(sources, (0.2, 0.8))] + change
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "the data order was written with" in err


# ---------------------------------------------------------------- bad input

def _refused(capsys, tmp_path, *args) -> str:
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(["train", SMOKE, *tiny_overrides("unused", run), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert not run.exists()   # refused before anything was written
    return err


def test_bad_mixtures_are_refused_with_one_line(sources, prose_char, tmp_path, capsys):
    web, code = sources
    assert "data.sources.1.weight = -0.3" in _refused(capsys, tmp_path, mixed(sources, (0.7, -0.3)))
    assert "every weight in data.sources is 0" in _refused(capsys, tmp_path, mixed(sources, (0, 0)))
    assert "two of data.sources are named 'web'" in _refused(
        capsys, tmp_path, "data.sources=" + json.dumps([{"path": web}, {"path": web}]))
    line = _refused(capsys, tmp_path, mixed((web, str(tmp_path))))
    assert str(tmp_path) in line and "manifest.json" in line
    line = _refused(capsys, tmp_path, mixed((web, prose_char)))
    assert "data.sources[1]" in line and "another tokenizer" in line and "vocab_size" in line
    line = _refused(capsys, tmp_path, mixed((web, str(tmp_path / "nowhere"))))
    assert "nowhere" in line and "not found" in line


# ---------------------------------------------------------------- ranks

@pytest.mark.slow
def test_two_ranks_read_and_report_what_one_process_does(sources, tmp_path):
    """World size 2 (real torchrun, gloo): the same batches, so the same losses, per source too."""
    common = dict(schedule__max_steps=12, logging__every=3, **TINY)
    one = bigtrain(["train", SMOKE, *tiny_overrides(sources[0], tmp_path / "one", **common), mixed(sources)])
    assert one.returncode == 0, one.stderr
    two = torchrun(2, ["train", SMOKE, *tiny_overrides(sources[0], tmp_path / "two", **common), mixed(sources)])
    assert two.returncode == 0, two.stderr
    a, b = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [3, 6, 9, 12]
    for x, y in zip(a, b):
        for key in ("loss", "loss/web", "loss/code"):
            assert x[key] == pytest.approx(y[key], rel=1e-4)
    for step in (1, 12):
        assert inspect_step(str(tmp_path / "one"), step) | {"run_dir": ""} == \
            inspect_step(str(tmp_path / "two"), step) | {"run_dir": ""}
