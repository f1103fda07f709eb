"""Checkpoints: exact resume, another world size, kill -9 recovery, crash mid-save, bad checkpoints.

The reference is always a run that was never interrupted, with the same config.
On CPU in fp32 a resumed run must match it bitwise (losses and final parameters)
at the same world size; at another world size the batches are the same and the
losses agree to float rounding (the reductions are grouped differently).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from bigtrain.checkpoint import committed, load_model, select
from bigtrain.cli import main
from bigtrain.data.order import SampleOrder
from bigtrain.parallel.env import DistEnv
from bigtrain.trainer import Trainer
from helpers import (REPO, bigtrain, fit, rank_env, read_jsonl, tiny_config, tiny_overrides, torchrun,
                     train_losses)

CPU = DistEnv(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
SMOKE = str(REPO / "configs" / "smoke.yaml")
STEPS = 8



def same_parameters(a, b) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def last_losses(run_dir) -> dict[int, float]:
    """step -> loss; a step logged twice (a restarted attempt) keeps its last value."""
    return dict(train_losses(run_dir))


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- one process (backend: none)

@pytest.fixture(scope="module")
def local_run(prose_bytes, tmp_path_factory) -> Path:
    """8 steps with dropout (so the RNG state matters), async saves every 2 steps, keep 2."""
    run = tmp_path_factory.mktemp("local") / "a"
    fit(tiny_config(prose_bytes, run, model__dropout=0.1, schedule__max_steps=STEPS,
                    checkpoint__every=2, checkpoint__keep=2, checkpoint__async=True))
    return run


def test_resume_is_bitwise_and_retention_keeps_the_newest(local_run, prose_bytes, tmp_path):
    assert [s for s, _ in committed(local_run / "checkpoints")] == [6, 8]
    assert not list((local_run / "checkpoints").glob("*.tmp"))
    resumed = fit(tiny_config(prose_bytes, tmp_path, model__dropout=0.1, schedule__max_steps=STEPS,
                              checkpoint__resume=str(local_run / "checkpoints" / "step-00000006")))
    assert last_losses(tmp_path) == {s: v for s, v in last_losses(local_run).items() if s > 6}
    assert same_parameters(resumed.model, load_model(local_run))
    assert resumed.state.step == STEPS and resumed.state.samples == STEPS * 8
    (event,) = read_jsonl(tmp_path / "ledger.jsonl")
    assert event["event"] == "resume" and event["step"] == 6 and event["path"].endswith("step-00000006")


def test_async_save_writes_what_a_sync_save_writes(local_run, prose_bytes, tmp_path):
    fit(tiny_config(prose_bytes, tmp_path, model__dropout=0.1, schedule__max_steps=STEPS,
                    checkpoint__every=2, checkpoint__keep=2))
    assert same_parameters(load_model(tmp_path, step=6), load_model(local_run, step=6))
    assert last_losses(tmp_path) == last_losses(local_run)


def test_async_save_holds_the_update_until_the_copy_is_taken(prose_bytes, tmp_path):
    """An async save copies the state to CPU in the background; an update that comes before
    the copy is complete must wait for it, or the checkpoint would mix two steps."""
    cfg = tiny_config(prose_bytes, tmp_path, model__n_layer=6, model__d_model=512, model__n_head=8,
                      model__seq_len=2, batch__global_size=1, batch__micro_size=1, checkpoint__async=True)
    trainer = Trainer(cfg, CPU)
    try:
        optimizer = trainer.backend.optimizer
        for p in trainer.model.parameters():
            p.grad = torch.full_like(p, 1e-3)
        optimizer.step()                    # the optimizer has state from here on
        saved = [p.detach().clone() for p in trainer.model.parameters()]
        trainer.checkpointer.save(1, trainer.parts())  # returns while the 19M-parameter state is being copied
        optimizer.step()                    # so this update has to wait for the copy
        trainer.checkpointer.wait()
        assert not same_parameters(trainer.model, load_model(tmp_path))
        assert all(torch.equal(p, q) for p, q in zip(load_model(tmp_path).parameters(), saved, strict=True))
    finally:
        trainer.close()


def test_a_rollback_target_outlives_retention_and_the_abandoned_timeline_is_deleted(prose_char, tmp_path,
                                                                                     capsys):
    """keep=2 with a save every step: the episode's own saves (40, 41) would push step 39, the
    last checkpoint before it, out of retention. It stays pinned, the run rolls back to it, and
    the checkpoints of the abandoned timeline are deleted before training goes on."""
    fit(tiny_config(prose_char, tmp_path, schedule__max_steps=44, schedule__decay="constant", eval__batches=0,
                    checkpoint__every=1, checkpoint__keep=2, stability__window=32, stability__warmup=20,
                    faults__spike_at=[40, 41, 42]))
    decisions = [e for e in read_jsonl(tmp_path / "ledger.jsonl") if e["event"] in ("rollback", "abort")]
    assert [(e["event"], e["step"], e["to_step"]) for e in decisions] == [("rollback", 42, 39)]
    assert "deleted steps [40, 41], newer than step 39 (abandoned timeline)" in capsys.readouterr().out
    assert [s for s, _ in committed(tmp_path / "checkpoints")] == [43, 44]  # unpinned once the episode ended


# ---------------------------------------------------------------- bad checkpoints

def damaged_run(local_run: Path, tmp_path: Path, damage) -> Path:
    run = tmp_path / "run"
    shutil.copytree(local_run / "checkpoints", run / "checkpoints")
    damage(run / "checkpoints" / "step-00000008")
    return run


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def newer_format(ckpt: Path) -> None:
    meta = json.loads((ckpt / "meta.json").read_text())
    (ckpt / "meta.json").write_text(json.dumps({**meta, "format_version": 99}))


BAD = {
    "missing shard": (lambda c: (c / "__0_0.distcp").unlink(), [], "file __0_0.distcp is missing"),
    "corrupted shard": (lambda c: flip_byte(c / "__0_0.distcp"), [], "__0_0.distcp is corrupted"),
    "other model": (lambda c: None, ["model.n_layer=3"], "model.n_layer=2 there, 3 in this config"),
    "newer format": (newer_format, [], "format version 99"),
    "not a checkpoint": (lambda c: (c / "meta.json").unlink(), [], "not a bigtrain checkpoint"),
    "unfinished write": (lambda c: c.rename(c.with_name(c.name + ".tmp")),
                         ["checkpoint.resume={run}/checkpoints/step-00000008.tmp"], "unfinished write"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_checkpoint_is_one_line_exit_2_and_nothing_is_touched(case, local_run, prose_bytes,
                                                                    tmp_path, capsys):
    damage, extra, message = BAD[case]
    run = damaged_run(local_run, tmp_path, damage)
    before = tree(run)
    overrides = tiny_overrides(prose_bytes, run, schedule__max_steps=STEPS)
    code = main(["train", SMOKE, *overrides, *[e.format(run=run) for e in extra]])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and "\n" not in err, err
    assert tree(run) == before  # nothing deleted, nothing written (not even config.yaml)


def test_fallback_to_an_older_checkpoint_only_when_asked(local_run, prose_bytes, tmp_path):
    run = damaged_run(local_run, tmp_path, lambda c: flip_byte(c / "__0_0.distcp"))
    proc = bigtrain(["train", SMOKE, *tiny_overrides(prose_bytes, run, schedule__max_steps=STEPS)])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "checkpoint.fallback" in proc.stderr
    fit(tiny_config(prose_bytes, run, model__dropout=0.1, schedule__max_steps=STEPS,
                    checkpoint__fallback=True))
    (event,) = read_jsonl(run / "ledger.jsonl")
    assert event["step"] == 6 and "corrupted" in event["passed_over"][0]
    assert same_parameters(load_model(run), load_model(local_run))  # 6 -> 8 again, bitwise


# ---------------------------------------------------------------- the data order

@pytest.fixture(scope="module")
def other_corpus(tmp_path_factory) -> str:
    """Another text, same (byte) tokenizer, no val split: ``data.val_fraction`` cuts its tail."""
    from bigtrain.data.prepare import prepare
    src = tmp_path_factory.mktemp("other") / "text.txt"
    src.write_text("".join(f"{i}: the quick brown fox jumps over the lazy dog, {i * i} times\n" for i in range(2000)))
    prepare(str(src), "bytes", str(src.parent / "prepared"), val_fraction=0.0)
    return str(src.parent / "prepared")


@pytest.fixture(scope="module")
def cut_run(other_corpus, tmp_path_factory) -> Path:
    """2 steps on the other corpus with a 10% val tail cut from its train split."""
    run = tmp_path_factory.mktemp("cut") / "run"
    fit(tiny_config(other_corpus, run, data__val_fraction=0.1, schedule__max_steps=2))
    return run


CHANGED = {  # run fixture, overrides, what the one line must say
    "seed": ("local_run", ["seed=8"], "written with seed 7, this run has seed 8"),
    "corpus": ("local_run", ["data.path={other}"], "written with train shards sha256 "),
    "sample count": ("cut_run", ["data.path={other}", "data.val_fraction=0.2"],
                     "written with data.val_fraction 0.1, this run has data.val_fraction 0.2"),
}


@pytest.mark.parametrize("case", sorted(CHANGED))
def test_resume_on_another_data_order_is_one_line_exit_2(case, request, other_corpus, prose_bytes, tmp_path,
                                                          capsys):
    source, extra, message = CHANGED[case]
    run = tmp_path / "run"
    shutil.copytree(request.getfixturevalue(source) / "checkpoints", run / "checkpoints")
    shutil.copy(request.getfixturevalue(source) / "config.yaml", run / "config.yaml")
    before = tree(run)
    overrides = tiny_overrides(prose_bytes, run, schedule__max_steps=STEPS + 2)
    code = main(["train", SMOKE, *overrides, *[e.format(other=other_corpus) for e in extra]])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and "\n" not in err, err
    assert "set checkpoint.accept_data_change=true if that is intended" in err
    # nothing deleted or replaced; config.yaml (what inspect replays) still the one the checkpoints follow
    assert {k: v for k, v in tree(run).items() if not k.startswith(("metrics", "ledger", "tb"))} == before


def test_an_intended_data_change_resumes_with_the_override(local_run, prose_bytes, tmp_path):
    shutil.copytree(local_run / "checkpoints", tmp_path / "checkpoints")
    resumed = fit(tiny_config(prose_bytes, tmp_path, seed=8, schedule__max_steps=STEPS + 2,
                              checkpoint__accept_data_change=True))
    assert resumed.state.step == STEPS + 2 and sorted(last_losses(tmp_path)) == [STEPS + 1, STEPS + 2]
    (event,) = read_jsonl(tmp_path / "ledger.jsonl")
    assert event["event"] == "resume" and event["step"] == STEPS
    # its own checkpoints carry the new order: going on with seed 8 needs no override any more
    fit(tiny_config(prose_bytes, tmp_path, seed=8, schedule__max_steps=STEPS + 4))
    assert sorted(last_losses(tmp_path)) == list(range(STEPS + 1, STEPS + 5))


# ---------------------------------------------------------------- two processes (backend: fsdp)

SHARDED = "parallel.vocab_table=sharded"


def train_args(data: str, run: Path, *extra: str, backend: str = "fsdp") -> list[str]:
    return ["train", SMOKE, *tiny_overrides(data, run, schedule__max_steps=STEPS, parallel__backend=backend), *extra]


def launch(nproc: int, data: str, run: Path, *extra: str, restarts: int = 0, backend: str = "fsdp"):
    return torchrun(nproc, train_args(data, run, *extra, backend=backend), timeout=600,
                    extra=["--max-restarts", str(restarts)] if restarts else [],
                    env={**rank_env(), "DS_ACCELERATOR": "cpu"})


@pytest.fixture(scope="module")
def fsdp_run(prose_bytes, tmp_path_factory) -> Path:
    """The uninterrupted reference on 2 ranks, async saves at steps 4 and 8. The token table is
    used on its shards (``parallel.vocab_table=sharded``: the tied head registered as both
    modules); the one-rank runs below gather it, so checkpoints cross both layouts."""
    run = tmp_path_factory.mktemp("fsdp") / "clean"
    proc = launch(2, prose_bytes, run, "checkpoint.every=4", "checkpoint.async=true", SHARDED)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


@pytest.mark.slow  # real processes (torchrun); `pytest -m 'not slow'` leaves it out
def test_kill9_and_crash_mid_save_recover_to_the_uninterrupted_run(fsdp_run, prose_bytes, tmp_path):
    run = tmp_path / "crashy"
    faults = ["checkpoint.every=4", "faults.rank=1", "faults.crash_in_checkpoint_at=8", SHARDED]
    # rank 1 dies while step 8 is being written: step 4 is committed, step 8 only a .tmp
    proc = launch(2, prose_bytes, run, *faults)
    assert proc.returncode != 0
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000004", "step-00000008.tmp"]
    assert (ckpts / "step-00000008.tmp" / ".metadata").exists()  # shards were written, never committed
    # again, under torchrun --max-restarts 1, and now rank 1 is also killed at step 6
    proc = launch(2, prose_bytes, run, *faults, "faults.crash_at=[6]", restarts=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("removed unfinished write") == 1
    assert [(e["event"], e["step"]) for e in read_jsonl(run / "ledger.jsonl")] == [("resume", 4), ("resume", 4)]
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000004", "step-00000008"]
    assert last_losses(run) == last_losses(fsdp_run)            # bitwise, every step
    assert same_parameters(load_model(run), load_model(fsdp_run))


@pytest.mark.slow  # real processes (torchrun); `pytest -m 'not slow'` leaves it out
def test_resume_at_another_world_size_reads_the_same_batches(fsdp_run, prose_bytes, tmp_path):
    # 2 -> 1: the 2-rank checkpoint of step 4 on one rank; it saves at 6 and 8
    one = tmp_path / "one"
    proc = launch(1, prose_bytes, one, "checkpoint.every=2",
                  f"checkpoint.resume={fsdp_run}/checkpoints/step-00000004")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # 1 -> 2: that 1-rank checkpoint of step 6 on two ranks
    two = tmp_path / "two"
    proc = launch(2, prose_bytes, two, f"checkpoint.resume={one}/checkpoints/step-00000006", SHARDED)
    assert proc.returncode == 0, proc.stderr[-3000:]

    reference = last_losses(fsdp_run)
    for run, first in ((one, 5), (two, 7)):
        losses = last_losses(run)
        assert sorted(losses) == list(range(first, STEPS + 1))
        assert losses == pytest.approx({s: reference[s] for s in losses}, rel=1e-5, abs=0)
    # restarted with the same command, the 1-rank run goes on from its own newest checkpoint
    again = tiny_config(prose_bytes, one, checkpoint__resume=f"{fsdp_run}/checkpoints/step-00000004")
    assert select(again, 1) == (one / "checkpoints" / "step-00000008", [])
    # the data position is what the uninterrupted run had, and the order depends on nothing else
    cfg = tiny_config(prose_bytes, tmp_path)
    resumed = Trainer(cfg, CPU)
    try:
        resumed.checkpointer.load(one / "checkpoints" / "step-00000006", resumed.parts())
        assert (resumed.state.step, resumed.state.position) == (6, 6 * 8)
        order = SampleOrder(resumed.order.num_samples, cfg.seed)
        batch = resumed.loader.get(resumed.state.position, 8)
        assert batch.samples.tolist() == order.sample_at(order.next_batch(48, 8)[0]).tolist()
    finally:
        resumed.close()


# ---------------------------------------------------------------- DeepSpeed (ZeRO-2, its own format)

@pytest.mark.slow  # real processes (torchrun); `pytest -m 'not slow'` leaves it out
def test_deepspeed_resume_is_bitwise_and_another_world_size_is_refused(prose_bytes, tmp_path):
    ds = ("parallel.zero_stage=2", "checkpoint.every=4")
    clean, resumed = tmp_path / "clean", tmp_path / "resumed"
    step4 = f"checkpoint.resume={clean}/checkpoints/step-00000004"
    proc = launch(2, prose_bytes, clean, *ds, backend="deepspeed")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = launch(2, prose_bytes, resumed, *ds, step4, backend="deepspeed")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert last_losses(resumed) == {s: v for s, v in last_losses(clean).items() if s > 4}
    assert same_parameters(load_model(resumed), load_model(clean))  # ZeRO partitions gathered
    # DeepSpeed cannot repartition ZeRO optimizer state for another world size: refused up front
    proc = bigtrain(train_args(prose_bytes, tmp_path / "one", *ds, step4, backend="deepspeed"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "holds deepspeed shards for 2 ranks" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1

