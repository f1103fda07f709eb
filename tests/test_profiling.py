"""profile.steps: a Chrome trace of the chosen steps, with the step's phases labelled, on every rank."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import fit, tiny_config, tiny_overrides, torchrun

PHASES = {"data", "forward_backward", "guard", "optimizer", "log", "checkpoint"}


def events(trace: Path) -> list[dict]:
    return [e for e in json.loads(trace.read_text())["traceEvents"] if e.get("ph") == "X"]


def ranges(trace: Path, name: str) -> list[tuple[float, float]]:
    return [(e["ts"], e["ts"] + e["dur"]) for e in events(trace) if e["name"] == name]


def test_trace_holds_the_chosen_steps_and_their_phases(prose_bytes, tmp_path):
    run = tmp_path / "run"
    fit(tiny_config(prose_bytes, run, schedule__max_steps=6, checkpoint__every=4, profile__steps=[3, 4]))
    assert [p.name for p in (run / "profile").iterdir()] == ["rank0.steps3-4.pt.trace.json"]
    trace = run / "profile" / "rank0.steps3-4.pt.trace.json"
    names = {e["name"] for e in events(trace)}
    steps = {n for n in names if n.startswith("bigtrain/step ")}
    assert steps == {"bigtrain/step 3", "bigtrain/step 4"}
    assert {f"bigtrain/{p}" for p in PHASES} <= names
    # every phase lies inside a step: one forward/backward per step, the checkpoint after step 4 in step 4
    step3, step4 = ranges(trace, "bigtrain/step 3")[0], ranges(trace, "bigtrain/step 4")[0]
    passes = ranges(trace, "bigtrain/forward_backward")
    assert [sum(s[0] <= a and b <= s[1] for s in (step3, step4)) for a, b in passes] == [1, 1]
    (a, b), = ranges(trace, "bigtrain/checkpoint")
    assert step4[0] <= a and b <= step4[1]


@pytest.mark.slow  # a torchrun launch
def test_every_rank_writes_its_trace(prose_bytes, tmp_path):
    run = tmp_path / "run"
    args = tiny_overrides(prose_bytes, run, schedule__max_steps=2, parallel__backend="fsdp", profile__steps=[2, 2])
    proc = torchrun(2, ["train", str(Path(__file__).parents[1] / "configs" / "smoke.yaml"), *args])
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        names = {e["name"] for e in events(run / "profile" / f"rank{rank}.steps2-2.pt.trace.json")}
        assert {"bigtrain/step 2", "bigtrain/forward_backward", "bigtrain/optimizer"} <= names
