"""FSDP2 and DeepSpeed ZeRO-1/2/3 on 2 real CPU processes (gloo) against one process.

One torchrun launch trains the tiny model with every distributed backend in turn
(tests/dist_worker.py); one plain process trains the reference (and FSDP and
DeepSpeed on a process group of one). Step 6 is skipped in every run the way
the stability guard skips, so the runs also prove that a skip leaves
parameters, Adam moments and Adam's step count untouched on every backend.
FSDP runs both ways of using the token table (``parallel.vocab_table``: gathered, or the
lookup and head on its shards), the latter with a tied and an untied head.
"""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from bigtrain.config import load_config
from bigtrain.launch import Topology, build
from bigtrain.parallel.deepspeed import deepspeed_config
from bigtrain.parallel.env import process_layout
from helpers import REPO, bigtrain, free_port, rank_env, read_jsonl, tiny_overrides

WORKER = str(Path(__file__).resolve().parent / "dist_worker.py")
SKIP = 6
ONE = ["fsdp", "deepspeed2"]                                      # on a process group of one
# +ac: activation checkpointing; +sharded/+gather: parallel.vocab_table; +untied: an untied head
TWO = ["fsdp+ac+sharded", "fsdp+gather", "fsdp+untied+sharded", "deepspeed1", "deepspeed2", "deepspeed3+ac"]
RUNS = [f"world1/{spec}" for spec in ONE] + [f"world2/{spec}" for spec in TWO]
REFERENCE = "world1/none"


def reference(run: str) -> str:
    """The one-process run of the same model."""
    return REFERENCE + ("+untied" if "untied" in run else "")
TOLERANCE = {"fsdp": 1e-4, "deepspeed": 1e-3}


def ds_env(threads: int = 1) -> dict:
    return {**rank_env(threads), "DS_ACCELERATOR": "cpu"}


def torchrun_worker(out: Path, data: str, specs: list[str], *extra: str, timeout: float = 300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
           "127.0.0.1", "--master-port", str(free_port()), WORKER, str(out), data, *specs, *extra]
    return subprocess.run(cmd, cwd=REPO, env=ds_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def runs(prose_bytes, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    one = subprocess.run([sys.executable, WORKER, str(out / "world1"), prose_bytes, "none", "none+untied", *ONE,
                          "--skip", str(SKIP)], cwd=REPO, env=ds_env(2), capture_output=True, text=True,
                         timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun_worker(out / "world2", prose_bytes, TWO, "--skip", str(SKIP))
    assert two.returncode == 0, two.stderr[-3000:]
    return out


def ranks(runs: Path, run: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((runs / run).glob("rank*.json"))]


def logged(runs: Path, run: str, key: str) -> list[float]:
    return [r[key] for r in read_jsonl(runs / run / "metrics.jsonl") if "loss" in r]


def tolerance(run: str) -> float:
    return TOLERANCE["deepspeed" if "deepspeed" in run else "fsdp"]


@pytest.mark.parametrize("run", RUNS)
def test_logged_losses_and_grad_norms_match_one_process(runs, run):
    """metrics.jsonl: the loss (token mean over the global batch) and the pre-clip global
    grad norm do not depend on the backend or the world size, step for step."""
    for key in ("loss", "grad_norm"):
        ref, got = logged(runs, reference(run), key), logged(runs, run, key)
        assert len(got) == len(ref) == 10
        assert got == pytest.approx(ref, rel=tolerance(run)), key


@pytest.mark.parametrize("run", [f"world2/{spec}" for spec in TWO])
def test_every_rank_sees_the_same_global_numbers(runs, run):
    r0, r1 = ranks(runs, run)
    assert (r0["world"], r1["world"]) == (2, 2)
    assert [s["grad_norm"] for s in r0["steps"]] == [s["grad_norm"] for s in r1["steps"]]
    assert [s["loss"] for s in r0["steps"]] == [s["loss"] for s in r1["steps"]]


@pytest.mark.parametrize("run", [f"world2/{spec}" for spec in TWO])
def test_ranks_read_exactly_the_global_batch(runs, run):
    """The rows the two ranks read, together, are the one-process global batch (as a multiset)."""
    (ref,) = ranks(runs, reference(run))
    r0, r1 = ranks(runs, run)
    for step, (a, b, whole) in enumerate(zip(r0["steps"], r1["steps"], ref["steps"]), 1):
        assert len(a["rows"]) == len(b["rows"]) == len(whole["rows"]) // 2
        mine = Counter(map(tuple, a["rows"] + b["rows"]))
        assert mine == Counter(map(tuple, whole["rows"])), f"step {step}"


@pytest.mark.parametrize("run", RUNS)
def test_final_parameters_identical_on_ranks_and_equal_to_one_process(runs, run):
    (ref,) = ranks(runs, reference(run))
    records = ranks(runs, run)
    assert all(r["final"] == records[0]["final"] for r in records)  # bit-identical across ranks
    rel = tolerance(run)
    for name, values in ref["final"].items():  # atol: Adam amplifies fp reordering on ~0 grads (test_train)
        got, want = torch.tensor(records[0]["final"][name]), torch.tensor(values)
        if "deepspeed3" in run:
            # ZeRO-3 sums gradients by reduce-scatter, in another order than one process: where an
            # element's gradient is ~0, Adam turns that rounding into up to one LR-sized step
            # (3e-3 here). Allow such elements (at most 1 in 1,000, each within one LR step); a
            # broken ZeRO-3 moves nearly every element away, and the losses are compared too.
            off = ~torch.isclose(got, want, rtol=rel, atol=max(rel / 10, 3e-5))
            assert off.float().mean() <= 1e-3 and bool(((got - want).abs() * off).max() <= 3e-3), (run, name)
            continue
        torch.testing.assert_close(got, want, rtol=rel, atol=max(rel / 10, 3e-5), msg=lambda m: f"{run} {name}: {m}")


@pytest.mark.parametrize("run", [REFERENCE] + RUNS)
def test_a_skipped_step_changes_nothing(runs, run):
    """At the skipped step the parameters, both Adam moments and Adam's step count stay
    exactly as they were; the next step updates again."""
    for record in ranks(runs, run):
        before, skipped, after = record["steps"][SKIP - 2:SKIP + 1]
        assert skipped["params"] == before["params"]
        assert skipped["moments"] == before["moments"]
        assert skipped["adam_steps"] == before["adam_steps"] == SKIP - 1
        assert after["adam_steps"] == SKIP and after["params"] != skipped["params"]


def test_a_failing_rank_ends_the_job(prose_bytes, tmp_path):
    """Rank 1 raises while rank 0 waits in a collective: the job exits non-zero long
    before the process-group timeout (600 s), with rank 1's traceback."""
    r = torchrun_worker(tmp_path, prose_bytes, ["fsdp"], "--fail-rank", "1", timeout=120)
    assert r.returncode != 0
    assert "deliberate failure on rank 1" in r.stderr and "[rank 1] failed; ending the job" in r.stderr


def test_fail_fast_exits_at_once_with_one_line_for_bad_input():
    code = ("import torch; from bigtrain.config import ConfigError; "
            "from bigtrain.parallel.env import DistEnv, fail_fast\n"
            "with fail_fast(DistEnv(1, 2, 1, torch.device('cpu'))):\n"
            "    raise ConfigError('config error: x = 1: expected 2')")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr == "[rank 1] config error: x = 1: expected 2\n"


@pytest.mark.parametrize("env, layout", [
    ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "SLURM_STEP_NUM_TASKS": "2"}, (3, 8, 1)),  # torchrun
    ({"SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "2", "SLURM_LOCALID": "0", "SLURM_NTASKS": "4"}, (2, 4, 0)),
    ({"SLURM_NTASKS": "4", "SLURM_PROCID": "0"}, (0, 1, 0)),  # the batch script itself: one process
])
def test_process_layout_from_the_launcher_environment(monkeypatch, env, layout):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_STEP_NUM_TASKS", "SLURM_PROCID", "SLURM_LOCALID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert process_layout() == layout


@pytest.mark.slow  # real processes (torchrun); `pytest -m 'not slow'` leaves it out
def test_launch_prints_and_runs_torchrun_for_fsdp(prose_bytes, tmp_path):
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(prose_bytes, run_dir, schedule__max_steps=3, parallel__precision="bf16")
    r = bigtrain(["launch", "configs/smoke-2rank.yaml", "--nproc-per-node", "2", *overrides], env=rank_env(1))
    assert r.returncode == 0, r.stderr[-3000:]
    command = r.stdout.splitlines()[0]
    assert "torchrun --nproc-per-node=2 --standalone -m bigtrain train configs/smoke-2rank.yaml" in command
    assert "backend=fsdp, world=2" in r.stdout
    assert [row["step"] for row in read_jsonl(run_dir / "metrics.jsonl") if "loss" in row] == [1, 2, 3]


def test_a_rank_of_a_job_leaves_with_its_output_written():
    """A process of a multi-process job (WORLD_SIZE > 1) ends with os._exit (bigtrain/__main__.py),
    after flushing: what it printed to a buffered pipe is all there, and so is its exit status."""
    env = {k: v for k, v in rank_env().items() if k != "PYTHONUNBUFFERED"}  # stdout buffered: a pipe
    args = ["plan", "configs/smoke.yaml", "model.vocab_size=257"]
    alone, rank = bigtrain(args, env=env), bigtrain(args, env={**env, "WORLD_SIZE": "2"})
    assert rank.returncode == alone.returncode == 0 and "bigtrain plan:" in alone.stdout
    assert rank.stdout == alone.stdout
    bad = bigtrain(["plan", "configs/smoke.yaml", "model.n_layer=0"], env={**env, "WORLD_SIZE": "2"})
    assert bad.returncode == 2 and bad.stderr.strip() and not bad.stdout


def test_launch_commands_for_deepspeed_and_several_nodes(prose_bytes, tmp_path):
    overrides = [f"data.path={prose_bytes}", f"run_dir={tmp_path}", "batch.micro_size=2"]
    ds = build("configs/gpt2-124m-zero3.yaml", overrides, Topology(4))
    assert ds.command[1:2] == ["--num_gpus=4"] and Path(ds.command[0]).name == "deepspeed"
    assert ds.command[3:] == ["--module", "bigtrain", "train", "configs/gpt2-124m-zero3.yaml", *overrides]
    multi = build("configs/gpt2-124m.yaml", overrides, Topology(8, nnodes=2, node_rank=1, rdzv_endpoint="n0:29400"))
    assert {"--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=n0:29400", "--node-rank=1"} <= set(multi.command)
    ds_multi = build("configs/gpt2-124m-zero2.yaml", overrides,
                     Topology(8, nnodes=2, node_rank=1, rdzv_endpoint="n0:29400"))
    assert {"--no_ssh", "--node_rank=1", "--master_addr=n0", "--master_port=29400"} <= set(ds_multi.command)
    assert ds_multi.hostfile == tmp_path / "hostfile" and not ds_multi.hostfile.exists()  # written at launch


def test_launcher_scripts_print_the_command(prose_bytes, tmp_path):
    env = {**rank_env(), "PYTHON": sys.executable, "NPROC_PER_NODE": "2"}
    args = ["configs/gpt2-124m-zero2.yaml", f"data.path={prose_bytes}", "batch.micro_size=2", "--dry-run"]
    for script, expect in [("torchrun.sh", "torchrun --nproc-per-node=2 --standalone -m bigtrain train"),
                           ("deepspeed.sh", "deepspeed --num_gpus=2 --master_port=")]:
        r = subprocess.run(["bash", f"launcher/{script}", *args], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0 and expect in r.stdout, r.stderr


def test_launch_rejects_a_world_that_does_not_divide_the_batch(prose_bytes, tmp_path):
    r = bigtrain(["launch", "configs/smoke-2rank.yaml", "--nproc-per-node", "3",
                  f"data.path={prose_bytes}", f"run_dir={tmp_path / 'run'}"])
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == ("config error: batch size 16 is not a multiple of batch.micro_size=8 "
                                "x world size 3")
    assert not (tmp_path / "run").exists()


def test_deepspeed_config_is_generated_from_ours():
    cfg = load_config("configs/gpt2-124m-zero3.yaml", overrides=["optim.grad_clip=0.5", "batch.micro_size=8"])
    ds = deepspeed_config(cfg, world=8)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) \
        == (512, 8, 8)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"] == {"enabled": True}
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["optimizer"]["type"] == "AdamW"
    params = ds["optimizer"]["params"]
    assert (params["lr"], params["betas"], params["weight_decay"]) == (6e-4, [0.9, 0.95], 0.1)
