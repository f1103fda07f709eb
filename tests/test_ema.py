"""The EMA of the weights: its closed form, skipped steps, bitwise resume, eval, export, FSDP parity.

The reference is the formula itself (on plain tensors), an uninterrupted run for a resume,
the step before for a skipped step, and one process for 2 FSDP ranks.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from bigtrain.checkpoint import load_model
from bigtrain.cli import main
from bigtrain.config import EMAConfig, load_config
from bigtrain.ema import EMA
from bigtrain.export import hf_state_dict
from helpers import REPO, fit, rank_env, read_jsonl, tiny_config, tiny_overrides, torchrun, train_losses

SMOKE = str(REPO / "configs" / "smoke.yaml")
EMA_ON = dict(ema__decay=0.9, ema__warmup=True, ema__every=2)


def same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def evals(run_dir) -> dict[int, dict]:
    return {r["step"]: r for r in read_jsonl(run_dir / "metrics.jsonl") if "val_loss" in r}


def test_update_is_the_closed_form_with_warmup_every_k_and_never_on_a_skipped_step():
    theta = {"w": torch.randn(5, 3), "b": torch.randn(3)}
    ema = EMA(theta, EMAConfig(decay=0.99, warmup=True, every=3), torch.device("cpu"))
    expected = {k: v.clone() for k, v in theta.items()}
    n = 0
    for step in range(1, 13):
        for v in theta.values():
            v.add_(torch.randn_like(v))  # what an optimizer step does to the parameters
        applied = step != 6
        # a skipped step arrives as a device tensor: it must not move the average (step 6 is one of its steps)
        ema.update(step, torch.tensor(applied) if step in (3, 6) else applied)
        if step % 3 == 0 and applied:
            d = min(0.99, (1 + 3 * n) / (10 + 3 * n)) ** 3
            for k in expected:
                expected[k] = d * expected[k] + (1 - d) * theta[k]
            n += 1
        for k, w in zip(ema.names, ema.weights):
            torch.testing.assert_close(w, expected[k], rtol=1e-6, atol=1e-6)
    assert int(ema.state_dict()["updates"]) == n == 3


@pytest.fixture(scope="module")
def ema_run(prose_bytes, tmp_path_factory):
    """10 steps with dropout and an EMA (warm-up, every 2 steps), checkpoints every 2; step 5 is skipped
    (a NaN gradient), so the checkpoints of steps 4 and 6 bracket it."""
    run = tmp_path_factory.mktemp("ema") / "run"
    fit(tiny_config(prose_bytes, run, model__dropout=0.1, checkpoint__every=2, checkpoint__keep=5,
                    eval__every=5, faults__nan_at=[5], **EMA_ON))
    return run


def test_a_skipped_step_leaves_the_ema_and_the_resume_is_bitwise(ema_run, prose_bytes, tmp_path):
    verdicts = {r["step"]: r["verdict"] for r in read_jsonl(ema_run / "metrics.jsonl") if "loss" in r}
    assert verdicts[5] == "nonfinite" and verdicts[6] == "ok"
    # EMA updates fall on even steps: 4 moves it, 6 would, but step 5's skip must not shift anything:
    # the EMA at 6 is the EMA at 4 moved once towards the weights of step 6
    at = {s: load_model(ema_run, s, ema=True) for s in (2, 4, 6)}
    assert not same(at[2], at[4]) and not same(at[4], at[6])
    # resumed from step 4 (before the skipped step) the run ends bitwise where the uninterrupted one did
    fit(tiny_config(prose_bytes, tmp_path, model__dropout=0.1, eval__every=5, faults__nan_at=[5],
                    checkpoint__resume=str(ema_run / "checkpoints" / "step-00000004"), **EMA_ON))
    assert dict(train_losses(tmp_path)) == {s: v for s, v in train_losses(ema_run) if s > 4}
    assert same(load_model(tmp_path, ema=True), load_model(ema_run, ema=True))
    assert same(load_model(tmp_path), load_model(ema_run))
    assert evals(tmp_path)[10] == evals(ema_run)[10]  # val_loss and val_loss_ema


def test_an_ema_skipped_by_the_guard_is_the_ema_of_the_step_before(prose_bytes, tmp_path):
    """ema.every=1: a checkpoint at every step; step 3 is skipped, so nothing may change from 2 to 3."""
    fit(tiny_config(prose_bytes, tmp_path, schedule__max_steps=4, checkpoint__every=1, checkpoint__keep=4,
                    faults__nan_at=[3], ema__decay=0.9))
    ema = {s: load_model(tmp_path, s, ema=True) for s in (2, 3, 4)}
    assert same(ema[2], ema[3]) and not same(ema[3], ema[4])
    assert same(load_model(tmp_path, 2), load_model(tmp_path, 3))


def test_a_checkpoint_without_ema_starts_it_at_its_weights(ema_run, prose_bytes, tmp_path):
    plain = tmp_path / "plain"
    fit(tiny_config(prose_bytes, plain, schedule__max_steps=4))
    fit(tiny_config(prose_bytes, tmp_path / "on", schedule__max_steps=4, **EMA_ON,
                    checkpoint__resume=str(plain / "checkpoints" / "step-00000004")))
    assert same(load_model(tmp_path / "on", ema=True), load_model(plain))


def test_a_rollback_restores_the_ema_of_its_target(prose_char, tmp_path):
    """Three spikes (40-42) roll back to step 35; the restored state, re-saved at step 35, holds the
    EMA of step 35 (as a run that stopped there has it), not the one the episode had moved on to."""
    common = dict(checkpoint__every=5, checkpoint__keep=20, schedule__decay="constant", stability__window=32,
                  stability__warmup=30, faults__spike_at=[40, 41, 42], ema__decay=0.9)
    fit(tiny_config(prose_char, tmp_path / "spiky", schedule__max_steps=45, **common))
    fit(tiny_config(prose_char, tmp_path / "stopped", schedule__max_steps=35, **common))
    (rollback,) = [e for e in read_jsonl(tmp_path / "spiky" / "ledger.jsonl") if e["event"] == "rollback"]
    assert rollback["to_step"] == 35
    assert same(load_model(tmp_path / "spiky", 35, ema=True), load_model(tmp_path / "stopped", 35, ema=True))
    assert not same(load_model(tmp_path / "spiky", 40, ema=True), load_model(tmp_path / "stopped", 35, ema=True))


def test_val_loss_ema_below_val_loss_in_a_noisy_run(prose_bytes, tmp_path):
    """A constant, high LR on batches of 8: the weights jitter around a plateau and their
    average sits lower (the numbers are in the report: bench/ema.py prints them too)."""
    fit(tiny_config(prose_bytes, tmp_path, optim__lr=2e-2, schedule__decay="constant", schedule__max_steps=100,
                    eval__every=25, eval__batches=4, logging__every=25, ema__decay=0.9, stability__enabled=False))
    late = [r for s, r in evals(tmp_path).items() if s >= 50]
    assert len(late) == 3
    assert sum(r["val_loss_ema"] for r in late) < sum(r["val_loss"] for r in late)


def test_export_ema_writes_the_averaged_weights(ema_run, tmp_path, capsys):
    assert main(["export", str(ema_run), "--out", str(tmp_path / "ema"), "--ema"]) == 0
    assert main(["export", str(ema_run), "--out", str(tmp_path / "plain")]) == 0
    exported = load_file(str(tmp_path / "ema" / "model.safetensors"))
    expected = hf_state_dict(load_model(ema_run, ema=True))
    assert exported.keys() == expected.keys()
    assert all(torch.equal(exported[k], expected[k]) for k in expected)
    plain = load_file(str(tmp_path / "plain" / "model.safetensors"))
    assert any(not torch.equal(plain[k], exported[k]) for k in plain)
    assert json.loads((tmp_path / "ema" / "bigtrain_export.json").read_text())["ema"] is True


def test_export_ema_of_a_run_without_it_is_one_line_exit_2(prose_bytes, tmp_path, capsys):
    fit(tiny_config(prose_bytes, tmp_path / "run", schedule__max_steps=2))
    capsys.readouterr()
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "out"), "--ema"]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds no EMA of the weights" in err and "\n" not in err
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def one_process(prose_bytes, tmp_path_factory):
    run = tmp_path_factory.mktemp("ema-one") / "run"
    fit(load_config(SMOKE, overrides=tiny_overrides(prose_bytes, run, **PARITY)))
    return run


PARITY = dict(checkpoint__every=5, eval__every=5, **EMA_ON)
BACKENDS = {"fsdp": ["parallel.backend=fsdp"],
            "zero2": ["parallel.backend=deepspeed", "parallel.zero_stage=2"],
            "zero3": ["parallel.backend=deepspeed", "parallel.zero_stage=3"]}


def two_ranks(data: str, run, backend: str, *extra: str):
    proc = torchrun(2, ["train", SMOKE, *tiny_overrides(data, run, **PARITY), *BACKENDS[backend], *extra],
                    env={**rank_env(), "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow  # real processes (torchrun)
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_two_ranks_keep_the_ema_of_one_process(backend, one_process, prose_bytes, tmp_path):
    """2 ranks each average their own shards (FSDP2) or ZeRO partitions (DeepSpeed); the
    checkpoint reassembles the EMA of one process, and eval swaps it in on every rank."""
    two_ranks(prose_bytes, tmp_path / "two", backend)
    # The EMA of 2 ranks may differ from one process's no more than the weights it averages do:
    # ZeRO-3's partitioned reductions round differently, and Adam turns that into weight
    # differences of up to ~1e-4 after 10 steps on near-zero gradients (the losses agree to 1e-6).
    weights = {n: (p - q).detach().abs().max() for (n, p), q in zip(load_model(one_process).named_parameters(),
                                                          load_model(tmp_path / "two").parameters(), strict=True)}
    one, two = load_model(one_process, ema=True), load_model(tmp_path / "two", ema=True)
    for (name, p), q in zip(one.named_parameters(), two.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=max(1e-5, 1.5 * float(weights[name])),
                                   msg=lambda m: f"{name}: {m}")
    for step in (5, 10):
        a, b = evals(one_process)[step], evals(tmp_path / "two")[step]
        assert b["val_loss_ema"] == pytest.approx(a["val_loss_ema"], rel=1e-4)
        assert b["val_loss_ema"] != b["val_loss"]
    if backend == "fsdp":  # a 2-rank EMA resumes on one rank: DCP reshards it
        shutil.copytree(tmp_path / "two" / "checkpoints", tmp_path / "resharded" / "checkpoints")
        fit(load_config(SMOKE, overrides=tiny_overrides(prose_bytes, tmp_path / "resharded", schedule__max_steps=12,
                                                        **PARITY)))
        assert sorted(dict(train_losses(tmp_path / "resharded"))) == [11, 12]
    if backend == "zero2":  # DeepSpeed's own checkpoint files carry it: a resume is bitwise
        two_ranks(prose_bytes, tmp_path / "resumed", backend,
                  f"checkpoint.resume={tmp_path / 'two' / 'checkpoints' / 'step-00000005'}")
        assert same(load_model(tmp_path / "resumed", ema=True), two)
        assert evals(tmp_path / "resumed")[10] == evals(tmp_path / "two")[10]
