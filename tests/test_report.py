"""``bigtrain report``: PNGs of a run, with the ledger's events marked, mid-write or finished."""
from __future__ import annotations

import json

from bigtrain.report import draw_report, segments
from helpers import bigtrain

PNG = b"\x89PNG\r\n\x1a\n"


def fake_run(run_dir) -> list[dict]:
    """A run that spiked, rolled back from step 12 to 8, was preempted and resumed, and is
    still writing (its last metrics line is cut off)."""
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("optim:\n  grad_clip: 1.0\n")
    lines = []
    for step in [*range(1, 13), *range(9, 21)]:  # steps 9..12 twice: the rollback redid them
        lines.append({"step": step, "loss": 5.0 - 0.1 * step, "lr": 1e-3, "grad_norm": 0.5 + 0.01 * step,
                      "tokens_per_s": 1000.0 + step, "mfu": 0.1, "samples": 8 * step, "verdict": "ok"})
    lines.insert(5, {"step": 5, "val_loss": 4.6, "val_ppl": 99.0})
    lines.insert(7, {"step": 6, "kind": "detail", "param_norm/tok_emb.weight": 2.0})
    events = [{"event": "spike", "step": 10}, {"event": "skip", "step": 10},
              {"event": "spike", "step": 11}, {"event": "skip", "step": 11},
              {"event": "spike", "step": 12}, {"event": "skip", "step": 12},
              {"event": "rollback", "step": 12, "to_step": 8, "skips": [[64, 96]]},
              {"event": "trace", "step": 14, "module": "blocks.1.mlp", "op": None},
              {"event": "preempt", "step": 16}, {"event": "resume", "step": 16}]
    text = "".join(json.dumps(r) + "\n" for r in lines) + '{"step": 21, "loss": 3.'
    (run_dir / "metrics.jsonl").write_text(text)
    (run_dir / "ledger.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return events


def test_report_draws_every_plot_and_marks_the_ledger(tmp_path):
    run = tmp_path / "run"
    fake_run(run)
    drawn = draw_report(run)
    names = [p.rsplit("/", 1)[-1] for p in drawn["files"]]
    assert names == ["loss.png", "lr.png", "grad_norm.png", "throughput.png"]
    for path in drawn["files"]:
        data = open(path, "rb").read()
        assert data.startswith(PNG) and len(data) > 10_000
    assert drawn["markers"] == {"spike": 3, "rollback": 1, "preempt": 1, "resume": 1, "skip": 3, "trace": 1}


def test_segments_split_where_a_rollback_redid_steps():
    records = [{"step": s, "loss": float(s)} for s in (1, 2, 3, 2, 3, 4)] + [{"step": 5, "val_loss": 1.0}]
    assert segments(records, "loss") == [([1, 2, 3], [1.0, 2.0, 3.0]), ([2, 3, 4], [2.0, 3.0, 4.0])]


def test_report_cli(tmp_path):
    run = tmp_path / "run"
    fake_run(run)
    out = bigtrain(["report", str(run), "--out", str(tmp_path / "pngs")])
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in (tmp_path / "pngs").iterdir()) == \
        ["grad_norm.png", "loss.png", "lr.png", "throughput.png"]
    missing = bigtrain(["report", str(tmp_path / "nowhere")])
    assert missing.returncode == 2 and "metrics.jsonl" in missing.stderr and "Traceback" not in missing.stderr
    assert not (tmp_path / "nowhere").exists()
