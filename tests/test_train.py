"""The single-process trainer: it learns, accumulation is exact, bf16 tracks fp32."""
from __future__ import annotations

import math

import pytest
import torch

from helpers import bigtrain, fit, read_jsonl, tiny_config, tiny_overrides



def losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


def test_short_run_learns_well_below_uniform(prose_char, tmp_path):
    """Char-level prose: train and val loss fall far below ln(vocab). The guard is off: at this
    lr most init draws spike once near the end of warmup (and recover), which the guard, with no
    checkpoint to roll back to, would turn into an abort; it has tests of its own."""
    cfg = tiny_config(prose_char, tmp_path, model__d_model=96, model__n_head=4, model__n_layer=2,
                      model__seq_len=64, batch__global_size=16, batch__micro_size=16, optim__lr=3e-3,
                      schedule__warmup_steps=10, schedule__max_steps=150, logging__every=10,
                      eval__batches=4, parallel__precision="bf16", stability__enabled=False)
    trainer = fit(cfg)
    uniform = math.log(cfg.model.vocab_size)
    train = losses(tmp_path)
    val = [r["val_loss"] for r in read_jsonl(tmp_path / "metrics.jsonl") if "val_loss" in r]
    assert sum(train[-5:]) / 5 < 0.62 * uniform, (train[-5:], uniform)   # the last 50 steps, 5 logged
    assert val and val[-1] < 0.65 * uniform, (val, uniform)
    assert trainer.state.step == 150 and trainer.state.samples == 150 * 16
    assert (tmp_path / "config.yaml").exists()


def test_gradient_accumulation_equals_one_big_micro_batch(prose_bytes, tmp_path):
    """Same global batch split into 4 micro-batches or 1: same losses and weights (fp32)."""
    one = fit(tiny_config(prose_bytes, tmp_path / "a", batch__micro_size=8, schedule__max_steps=6))
    four = fit(tiny_config(prose_bytes, tmp_path / "b", batch__micro_size=2, schedule__max_steps=6))
    assert losses(tmp_path / "a") == pytest.approx(losses(tmp_path / "b"), rel=1e-5)
    for p, q in zip(one.model.parameters(), four.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=2e-5)  # Adam amplifies fp reordering on ~0 grads


def test_bf16_tracks_fp32(prose_bytes, tmp_path):
    fp32 = losses_of(prose_bytes, tmp_path / "fp32", "fp32")
    bf16 = losses_of(prose_bytes, tmp_path / "bf16", "bf16")
    assert max(abs(a - b) / a for a, b in zip(fp32, bf16)) < 0.02


def losses_of(data, run_dir, precision):
    fit(tiny_config(data, run_dir, parallel__precision=precision, schedule__max_steps=20))
    return losses(run_dir)


def test_metrics_names_and_token_accounting(prose_bytes, tmp_path, monkeypatch):
    # a stated peak: the MFU's closed form, whatever this (shared) CPU sustains at the moment
    monkeypatch.setenv("BIGTRAIN_PEAK_FLOPS", "1e12")
    trainer = fit(tiny_config(prose_bytes, tmp_path, schedule__max_steps=4, logging__every=2))
    rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [2, 4]
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "samples", "verdict", "clip_rate"):
        assert key in rows[0]
    assert rows[-1]["samples"] == 4 * 8 and rows[-1]["tokens"] == 4 * 8 * 32
    flops = trainer.backend.raw_model.flops_per_token()  # 6N + 12LdT (tests/test_model.py checks it)
    assert rows[-1]["mfu"] == pytest.approx(rows[-1]["tokens_per_s"] * flops / 1e12, rel=1e-6)


def test_same_seed_same_run_and_data_order_is_the_global_order(prose_bytes, tmp_path):
    a = fit(tiny_config(prose_bytes, tmp_path / "a", schedule__max_steps=3))
    b = fit(tiny_config(prose_bytes, tmp_path / "b", schedule__max_steps=3))
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    # the first global batch is positions 0..7 of the stream, in the Feistel order
    positions, end = a.order.next_batch(0, 8)
    assert list(positions) == list(range(8)) and end == 8
    assert sorted(a.order.sample_at(positions)) != list(range(8))  # shuffled, not sequential
    assert b.state.position == 24


def test_cli_train_end_to_end_and_bad_data(prose_bytes, tmp_path):
    r = bigtrain(["train", "configs/smoke.yaml", *tiny_overrides(prose_bytes, tmp_path / "run",
                                                                  schedule__max_steps=3)])
    assert r.returncode == 0, r.stderr
    assert "tensorboard" in r.stdout and (tmp_path / "run" / "metrics.jsonl").exists()
    r = bigtrain(["prepare", "--source", "stdlib", "--tokenizer", "wordpiece", "--out", str(tmp_path / "d")])
    assert r.returncode == 2 and "wordpiece" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "d").exists()
    r = bigtrain(["train", "configs/smoke.yaml", *tiny_overrides(prose_bytes, tmp_path / "r2",
                                                                  model__vocab_size=300)])
    assert r.returncode == 2 and "vocab_size=300" in r.stderr


def test_corrupted_shard_is_refused_before_training(prose_bytes, tmp_path):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(prose_bytes, data)
    shard = sorted(data.glob("train-*.bin"))[0]
    raw = bytearray(shard.read_bytes())
    raw[100] ^= 0xFF
    shard.write_bytes(bytes(raw))
    r = bigtrain(["train", "configs/smoke.yaml", *tiny_overrides(str(data), tmp_path / "run")])
    assert r.returncode == 2 and shard.name in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


def test_saving_a_checkpoint_never_changes_the_run(prose_bytes, tmp_path):
    """Step 1 is skipped (a NaN), so step 1's checkpoint is taken before any update was
    applied; the run that saves it must end bitwise where the run that does not ends."""
    def run(every: int):
        trainer = fit(tiny_config(prose_bytes, tmp_path / str(every), faults__nan_at=[1],
                                  schedule__max_steps=3, checkpoint__every=every, eval__batches=0))
        steps = {int(s["step"]) for s in trainer.backend.optimizer.state.values()}
        return [p.detach() for p in trainer.model.parameters()], steps

    (saving, saving_steps), (plain, plain_steps) = run(1), run(0)
    assert saving_steps == plain_steps == {2}  # two updates applied, the skipped one not counted
    assert all(torch.equal(p, q) for p, q in zip(saving, plain, strict=True))
