"""The Checkpointer alone (no Trainer): parts round trip, retention, atomic re-save, abandon, recovery.

Every test builds a real backend and saves real checkpoints in one process; the
crash tests SIGKILL a child process at a chosen rename or delete (see
checkpointer_parts.py) and then resume from what it left on disk.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bigtrain.checkpoint import committed
from bigtrain.config import ConfigError
from bigtrain.data.order import SampleOrder
from checkpointer_parts import build, fill, value_of
from helpers import REPO, rank_env

CHILD = Path(__file__).with_name("checkpointer_parts.py")


def steps(run_dir: Path) -> list[int]:
    return [s for s, _ in committed(run_dir / "checkpoints")]


def entries(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def killed(run_dir: Path, scenario: str) -> None:
    env = {**rank_env(), "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(CHILD), str(run_dir), scenario], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_load_restores_every_part_the_optimizer_and_the_rng(tmp_path, mode):
    ckpt, parts = build(tmp_path, f"checkpoint.async={str(mode == 'async').lower()}")
    backend = parts["model"]
    params = list(backend.model.parameters())
    for p in params:
        p.grad = torch.ones_like(p)
    backend.optimizer.step()  # AdamW moments and step count exist from here on
    fill(parts, 5.0)
    path = ckpt.save(3, parts)
    ckpt.wait()
    saved_optim = {k: v.clone() for k, v in backend.optimizer.state[params[0]].items()}
    draws = torch.rand(4)     # what the RNG gives after the save

    backend.optimizer.step()  # move everything away from the saved state
    fill(parts, 9.0)
    torch.rand(100)
    fresh, parts2 = build(tmp_path)  # a new process's worth of objects would do the same
    fresh.load(path, parts2)
    assert value_of(parts2) == 5.0 and parts2["counter"].value == 5
    for k, v in parts2["model"].optimizer.state[list(parts2["model"].model.parameters())[0]].items():
        assert torch.equal(v, saved_optim[k]), k
    assert torch.equal(torch.rand(4), draws)


def test_a_part_that_refuses_its_state_stops_the_load_before_the_shards(tmp_path):
    """The data order checks its fingerprint: another seed is one line, and the model is untouched."""
    ckpt, parts = build(tmp_path)
    fill(parts, 1.0)
    parts["order"] = SampleOrder(1000, seed=7, skip=[(5, 9)])
    path = ckpt.save(1, parts)
    fresh, parts2 = build(tmp_path)
    fill(parts2, 4.0)
    parts2["order"] = SampleOrder(1000, seed=8)
    with pytest.raises(ConfigError, match="written with seed 7, this run has seed 8; set checkpoint.accept_data"):
        fresh.load(path, parts2)
    assert value_of(parts2) == 4.0 and parts2["order"].skips == []
    parts2["order"] = SampleOrder(1000, seed=7)
    fresh.load(path, parts2)
    assert value_of(parts2) == 1.0 and parts2["order"].skips == [(5, 9)]


def test_retention_keeps_the_newest_and_never_the_protected_one(tmp_path):
    ckpt, parts = build(tmp_path, "checkpoint.keep=2")
    ckpt.save(1, parts)
    ckpt.save(2, parts)
    ckpt.protect(2)                    # a rollback target, whatever checkpoint.keep says
    for step in (3, 4, 5, 6):
        ckpt.save(step, parts)
    assert steps(tmp_path) == [2, 5, 6]
    ckpt.protect(None)
    ckpt.save(7, parts)
    assert steps(tmp_path) == [6, 7]
    assert entries(tmp_path) == ["step-00000006", "step-00000007"]  # no leftovers of the deletes


def test_saving_a_committed_step_again_replaces_it(tmp_path):
    ckpt, parts = build(tmp_path)
    fill(parts, 1.0)
    ckpt.save(2, parts)
    fill(parts, 2.0)
    ckpt.load(ckpt.committed()[-1][1], parts)  # as after a rollback: a save of step 2 must write again
    assert value_of(parts) == 1.0
    fill(parts, 2.0)
    ckpt.save(2, parts)
    assert entries(tmp_path) == ["step-00000002"]
    fresh, parts2 = build(tmp_path)
    assert fresh.resume(parts2).step == 2 and value_of(parts2) == 2.0


@pytest.mark.parametrize("scenario, survivor, said", [("resave-killed-before-commit", 1.0, "restored"),
                                                      ("resave-killed-after-commit", 2.0, "removed replaced")])
def test_a_crash_while_replacing_a_checkpoint_leaves_the_old_or_the_new_one(tmp_path, scenario, survivor, said):
    killed(tmp_path, scenario)
    assert "step-00000002.old" in entries(tmp_path)  # the crash left the old checkpoint aside
    lines = []
    ckpt, parts = build(tmp_path, log=lines.append)
    resumed = ckpt.resume(parts)
    assert resumed.step == 2 and value_of(parts) == survivor
    assert entries(tmp_path) == ["step-00000002"]
    assert any(said in line for line in lines), lines


def test_abandon_after_deletes_the_newer_timeline_for_good(tmp_path):
    ckpt, parts = build(tmp_path, "checkpoint.keep=5")
    for step in (2, 4, 6, 8):
        fill(parts, float(step))
        ckpt.save(step, parts)
    assert ckpt.abandon_after(4) == [6, 8]
    assert entries(tmp_path) == ["step-00000002", "step-00000004"]
    fill(parts, 5.0)
    ckpt.save(6, parts)                 # the new timeline saves its own step 6
    fresh, parts2 = build(tmp_path)
    assert fresh.resume(parts2).step == 6 and value_of(parts2) == 5.0
    assert steps(tmp_path) == [2, 4, 6]


def test_a_crash_while_abandoning_never_resumes_the_abandoned_timeline(tmp_path):
    killed(tmp_path, "abandon-killed-before-delete")
    assert steps(tmp_path) == [2]       # renamed out of the way before any byte was deleted
    ckpt, parts = build(tmp_path)
    assert ckpt.resume(parts).step == 2 and value_of(parts) == 2.0
    assert entries(tmp_path) == ["step-00000002"]


def test_resume_removes_unfinished_writes_and_loads_the_newest(tmp_path):
    ckpt, parts = build(tmp_path)
    fill(parts, 3.0)
    ckpt.save(3, parts)
    ckpt.save(4, parts)
    final = tmp_path / "checkpoints" / "step-00000004"
    final.rename(final.with_name("step-00000004.tmp"))  # step 4 never committed
    lines = []
    fresh, parts2 = build(tmp_path, log=lines.append)
    resumed = fresh.resume(parts2)
    assert resumed.step == 3 and value_of(parts2) == 3.0 and resumed.passed_over == []
    assert entries(tmp_path) == ["step-00000003"]
    assert any("removed unfinished write" in line for line in lines), lines


def test_a_bad_newest_checkpoint_stops_unless_fallback(tmp_path):
    ckpt, parts = build(tmp_path)
    for step in (1, 2):
        fill(parts, float(step))
        ckpt.save(step, parts)
    shard = tmp_path / "checkpoints" / "step-00000002" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    before = entries(tmp_path)
    with pytest.raises(ConfigError, match="corrupted.*checkpoint.fallback=true") as e:
        build(tmp_path)[0].resume(build(tmp_path)[1])
    assert "\n" not in str(e.value) and entries(tmp_path) == before
    fresh, parts2 = build(tmp_path, "checkpoint.fallback=true")
    resumed = fresh.resume(parts2)
    assert resumed.step == 1 and value_of(parts2) == 1.0 and "corrupted" in resumed.passed_over[0]
    assert entries(tmp_path) == before  # an unusable checkpoint is passed over, never deleted


def test_every_file_is_fsynced_before_the_commit(tmp_path, monkeypatch):
    """A backend that writes without fsync (as DeepSpeed's torch.save calls do): its
    files must still be on disk before the checkpoint is committed."""
    ckpt, parts = build(tmp_path)
    backend = parts["model"]
    real_save = backend.save_sharded

    def save_without_fsync(path):
        real_save(path)
        (Path(path) / "extra_shard.pt").write_bytes(b"x" * 1000)

    monkeypatch.setattr(backend, "save_sharded", save_without_fsync)
    synced, real_fsync = set(), os.fsync
    manifest_first = []

    def spy(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        synced.add(path)
        if path.endswith("manifest.json"):
            manifest_first.append(set(synced))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    final = ckpt.save(1, parts)
    tmp = str(final) + ".tmp"
    files = {f"{tmp}/{p.relative_to(final)}" for p in final.rglob("*") if p.is_file() and p.name != "manifest.json"}
    assert f"{tmp}/extra_shard.pt" in files
    assert files <= manifest_first[0], files - manifest_first[0]

