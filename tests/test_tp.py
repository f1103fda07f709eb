"""Tensor parallelism (parallel.tp) on 4 real CPU processes (gloo, fp32) against one process.

One torchrun launch trains both model styles at tp=2 x dp=2 with FSDP2
(tests/tp_worker.py): gpt2 (layernorm, gelu, learned positions, biases, tied head,
a vocabulary of 257 that does not split evenly) with document masking on a corpus of
one document per paragraph, and llama (rmsnorm, swiglu, rope, untied head) with the
vocabulary-parallel loss and a z-loss. One plain process trains the same
two runs without any parallelism: the reference. The gpt2 runs take a NaN in one
rank's gradient at step 3 (the guard must skip that step everywhere), and their
step-5 checkpoint is resumed on one process, at (dp=4, tp=1) and at (dp=1, tp=2).
"""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from bigtrain.config import ConfigError
from bigtrain.data.splits import check_world
from helpers import REPO, bigtrain, free_port, rank_env, read_jsonl, tiny_config, tiny_overrides

WORKER = str(Path(__file__).resolve().parent / "tp_worker.py")
STYLES = ["gpt2", "llama"]
NAN_AT = 3
REL = 1e-5


def worker(nproc: int, out: Path, specs: list[str], *extra: str) -> None:
    args = [WORKER, str(out), *specs, *extra]
    if nproc > 1:
        args = ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
                "--master-port", str(free_port()), *args]
    r = subprocess.run([sys.executable, *args], cwd=REPO, env=rank_env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="module")
def paragraphs(docs_text, tmp_path_factory) -> str:
    """One document per paragraph, byte tokenizer: windows of 32 tokens hold document boundaries."""
    from bigtrain.data.prepare import prepare
    src = tmp_path_factory.mktemp("src") / "paragraphs.jsonl"
    src.write_text("".join(json.dumps({"text": p}) + "\n" for p in docs_text[:100_000].split("\n\n")))
    out = tmp_path_factory.mktemp("data") / "paragraphs"
    prepare(str(src), "bytes", str(out), val_fraction=0.0)
    return str(out)


@pytest.fixture(scope="module")
def runs(paragraphs, prose_char, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tp")
    specs = [f"gpt2+dm={paragraphs}", f"llama+lp+z={prose_char}"]
    worker(1, out / "one", specs, "--nan-at", str(NAN_AT))
    worker(4, out / "tp2", specs, "--backend", "fsdp", "--tp", "2", "--nan-at", str(NAN_AT))
    return out


def logged(run_dir: Path, key: str) -> list[float]:
    return [r[key] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


def ranks(run_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(run_dir.glob("rank*.json"))]


@pytest.mark.slow
@pytest.mark.parametrize("style", STYLES)
def test_tp2_dp2_matches_one_process(runs, style):
    """The loss (one number on every rank) and the global grad norm (tp-replicated parameters
    counted once) of every step equal one process's, for both model styles."""
    for key in ("loss", "grad_norm"):
        ref, got = logged(runs / "one" / style, key), logged(runs / "tp2" / style, key)
        assert len(got) == len(ref) == 10
        assert got == pytest.approx(ref, rel=REL, nan_ok=True), key  # the NaN step too


@pytest.mark.slow
def test_a_nan_on_one_rank_skips_the_step_on_all(runs):
    """faults.nan_at poisons one gradient shard on the last rank only; every rank skips the step."""
    for world in ("one", "tp2"):
        lines = [r for r in read_jsonl(runs / world / "gpt2" / "metrics.jsonl") if "loss" in r]
        assert [r["verdict"] for r in lines].count("nonfinite") == 1
        assert lines[NAN_AT - 1]["verdict"] == "nonfinite" and lines[-1]["skipped"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("style", STYLES)
def test_initial_weights_are_the_same_at_tp2(runs, style):
    """Every tensor gathered whole at step 0 is bitwise what one process draws."""
    (one,) = ranks(runs / "one" / style)
    for record in ranks(runs / "tp2" / style):
        assert record["init"] == one["init"]


@pytest.mark.slow
def test_a_tp_group_reads_the_same_rows_and_dp_ranks_the_global_batch(runs):
    (one,) = ranks(runs / "one" / "gpt2")
    records = ranks(runs / "tp2" / "gpt2")
    by_dp = {r["dp_rank"]: r["rows"] for r in records}
    for r in records:
        assert r["rows"] == by_dp[r["dp_rank"]]  # both tp ranks of a dp group read the same rows
    assert sorted(by_dp) == [0, 1]
    for step, whole in enumerate(one["rows"]):
        assert Counter(map(tuple, by_dp[0][step] + by_dp[1][step])) == Counter(map(tuple, whole))


@pytest.fixture(scope="module")
def resumed(runs, paragraphs) -> Path:
    """The (dp=2, tp=2) gpt2 run's step-5 checkpoint, resumed on one process, at (dp=4, tp=1) and at (dp=1, tp=2)."""
    step5 = str(runs / "tp2" / "gpt2" / "checkpoints" / "step-00000005")
    worker(1, runs / "resume-one", [f"gpt2+dm={paragraphs}"], "--resume", step5)
    worker(4, runs / "resume-dp4", [f"gpt2+dm={paragraphs}"], "--backend", "fsdp", "--resume", step5,
           "--micro-size", "2")
    worker(2, runs / "resume-tp2", [f"gpt2+dm={paragraphs}"], "--backend", "fsdp", "--tp", "2", "--resume", step5)
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("where", ["resume-one", "resume-dp4", "resume-tp2"])
def test_a_tp_checkpoint_resumes_on_other_layouts(resumed, where):
    """Model and optimizer state resharded by DCP: the following losses are the uninterrupted run's."""
    want = logged(resumed / "tp2" / "gpt2", "loss")[5:]
    got = [r["loss"] for r in read_jsonl(resumed / where / "gpt2" / "metrics.jsonl") if "loss" in r]
    assert len(got) == 5
    assert got == pytest.approx(want, rel=REL)


@pytest.mark.slow
def test_load_model_and_export_gather_a_tp_run(runs, tmp_path):
    from safetensors.torch import load_file

    from bigtrain.checkpoint import load_model
    from bigtrain.export import export
    ref = load_model(runs / "one" / "llama")
    got = load_model(runs / "tp2" / "llama")
    for (name, a), (_, b) in zip(ref.named_parameters(), got.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=3e-5, msg=lambda m: f"{name}: {m}")
    ours = load_file(str(export(runs / "tp2" / "gpt2", tmp_path / "tp") / "model.safetensors"))
    theirs = load_file(str(export(runs / "one" / "gpt2", tmp_path / "one") / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=3e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("extra, world, why", [
    ({"parallel__tp": 2}, 3, "parallel.tp=2 does not divide world size=3"),
    ({"parallel__tp": 4, "model__n_head": 2}, 4, "parallel.tp=4 does not divide model.n_head=2"),
    ({"parallel__tp": 2, "parallel__loss_parallel": True, "model__vocab_size": 257}, 2,
     "parallel.tp=2 does not divide model.vocab_size=257"),
    ({"parallel__tp": 2, "parallel__backend": "deepspeed"}, 2, "parallel.tp=2 needs parallel.backend=fsdp"),
    ({"parallel__tp": 2, "parallel__backend": "none"}, 2, "parallel.tp=2 needs parallel.backend=fsdp"),
    ({"parallel__tp": 2, "model__seq_len": 33}, 2, "parallel.tp=2 does not divide model.seq_len=33"),
    ({"parallel__loss_parallel": True}, 1, "parallel.loss_parallel needs parallel.tp > 1"),
])
def test_layouts_tp_cannot_split_are_refused(prose_bytes, tmp_path, extra, world, why):
    cfg = tiny_config(prose_bytes, tmp_path, **{"parallel__backend": "fsdp", "model__vocab_size": 256, **extra})
    with pytest.raises(ConfigError, match=why.replace(".", r"\.").replace("+", r"\+")):
        check_world(cfg, world)


def test_train_refuses_a_bad_layout_in_one_line_before_any_process_group(prose_bytes, tmp_path):
    r = bigtrain(["train", str(REPO / "configs" / "smoke.yaml"),
                  *tiny_overrides(prose_bytes, tmp_path / "run", parallel__backend="fsdp", parallel__tp=2)])
    assert r.returncode == 2
    assert r.stderr.strip() == "config error: parallel.tp=2 does not divide world size=1"
    assert not (tmp_path / "run").exists()
