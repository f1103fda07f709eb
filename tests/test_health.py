"""Detail metrics (per-layer norms, update ratios, activations) and anomaly tracing."""
from __future__ import annotations

import math
import sys

import pytest
import torch

from bigtrain.parallel.env import DistEnv
from bigtrain.trainer import Trainer
from helpers import REPO, free_port, rank_env, read_jsonl, tiny_config, tiny_overrides

CPU = DistEnv(rank=0, world=1, local_rank=0, device=torch.device("cpu"))


def details(run_dir) -> list[dict]:
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("kind") == "detail"]


def events_of(run_dir) -> list[dict]:
    return read_jsonl(run_dir / "ledger.jsonl")


def test_detail_metrics_only_on_detail_steps_and_match_hand_computed(prose_bytes, tmp_path):
    cfg = tiny_config(prose_bytes, tmp_path, logging__detail_every=3, schedule__max_steps=6,
                      logging__tensorboard=True)
    trainer = Trainer(cfg, CPU)
    before, seen = {}, {"blocks.1": [], "logits": []}
    # by hand: the weights just before each update, and the last step's block-1 outputs and logits
    trainer.backend.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: before.update({n: p.detach().clone() for n, p in trainer.model.named_parameters()}))
    for name, module in (("blocks.1", trainer.model.blocks[1]), ("logits", trainer.model.lm_head)):
        module.register_forward_hook(lambda m, a, out, name=name: seen[name].append(out.detach().clone())
                                     if trainer.state.step + 1 == 6 else None)
    try:
        trainer.fit()
    finally:
        trainer.close()

    lines = details(tmp_path)
    assert [r["step"] for r in lines] == [3, 6] and all(r["applied"] for r in lines)
    last, params = lines[-1], dict(trainer.model.named_parameters())
    for name, p in params.items():
        assert last[f"param_norm/{name}"] == pytest.approx(float(torch.linalg.norm(p.detach())), rel=1e-5)
        ratio = torch.linalg.norm(p.detach() - before[name]) / torch.linalg.norm(before[name])
        assert last[f"update_ratio/{name}"] == pytest.approx(float(ratio), rel=1e-4, abs=1e-9)
    train = {r["step"]: r for r in read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r}
    for line in lines:  # per-layer norms are pre-clip: they add up to the step's global norm
        total = math.sqrt(sum(line[f"grad_norm/{n}"] ** 2 for n in params))
        assert total == pytest.approx(train[line["step"]]["grad_norm"], rel=1e-5)
    assert any(train[s]["clip_rate"] > 0 for s in (3, 6))  # so the un-clipping was exercised
    for name, key in (("blocks.1", "act/blocks.1"), ("logits", "logits")):
        x = torch.cat([t.flatten() for t in seen[name]]).double()  # both micro-batches of step 6
        assert len(seen[name]) == 2
        assert last[f"{key}/mean"] == pytest.approx(float(x.mean()), rel=1e-4, abs=1e-7)
        assert last[f"{key}/std"] == pytest.approx(float(x.std(correction=0)), rel=1e-4)
        assert last[f"{key}/max"] == pytest.approx(float(x.abs().max()), rel=1e-6)
    assert list((tmp_path / "tb").glob("events.*"))  # histograms and detail/ scalars went somewhere
    assert not trainer.health.active and not trainer.model.blocks[0]._forward_hooks  # hooks were removed


def poison(trainer: Trainer, module: str, step: int, fn) -> None:
    trainer.model.get_submodule(module).register_forward_hook(
        lambda m, args, out: fn(out) if trainer.state.step + 1 == step else None)


def test_anomaly_trace_names_the_module_and_the_backward_op(prose_bytes, tmp_path):
    """Forward: a NaN out of blocks.1.mlp at step 2. Backward: sqrt(0) in blocks.0.attn's output
    at step 4 is finite forward, infinite backward. The run skips both and goes on; tracing
    leaves the run exactly as it would have been without it."""
    finals = {}
    for trace in (True, False):
        cfg = tiny_config(prose_bytes, tmp_path / str(trace), stability__trace_anomalies=trace,
                          schedule__max_steps=6)
        trainer = Trainer(cfg, CPU)
        poison(trainer, "blocks.1.mlp", 2, lambda out: out * float("nan"))
        poison(trainer, "blocks.0.attn", 4, lambda out: out + torch.sqrt(out - out))
        try:
            trainer.fit()
        finally:
            trainer.close()
        finals[trace] = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        events = read_jsonl(tmp_path / str(trace) / "ledger.jsonl")
        assert [(e["event"], e["step"]) for e in events if e["event"] in ("nonfinite", "trace")] == \
            ([("trace", 2), ("nonfinite", 2), ("trace", 4), ("nonfinite", 4)] if trace else
             [("nonfinite", 2), ("nonfinite", 4)])
        losses = [r["loss"] for r in read_jsonl(tmp_path / str(trace) / "metrics.jsonl") if "loss" in r]
        assert trainer.state.step == 6 and all(math.isfinite(x) for x in losses[4:])
    traces = [e for e in events_of(tmp_path / "True") if e["event"] == "trace"]
    assert traces[0]["module"] == "blocks.1.mlp" and traces[0]["op"] is None and traces[0]["reproduced"]
    assert traces[1]["module"] is None and traces[1]["op"] == "SqrtBackward0"
    assert "torch.sqrt" in traces[1]["line"]  # the forward line that made the op
    for name, p in finals[True].items():
        assert torch.equal(p, finals[False][name]), name


@pytest.mark.slow  # real processes (torchrun); `pytest -m 'not slow'` leaves it out
def test_fsdp_detail_metrics_and_trace_match_one_process(prose_bytes, tmp_path):
    """2 ranks of FSDP2 (sharded DTensors): the same detail numbers as one process, and a NaN
    that only rank 1 sees is traced to its module and reported once (the token table used on
    its shards, whose backward spreads rank 1's NaN to rank 0's shard: not named)."""
    import subprocess
    common = dict(logging__detail_every=3, schedule__max_steps=6, batch__micro_size=2,
                  stability__trace_anomalies=True)
    worker = [str(REPO / "tests" / "health_worker.py"), "blocks.1.mlp", "2"]
    env = {**rank_env(1), "PYTHONPATH": str(REPO / "tests")}
    fsdp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *worker, "1",
                           *tiny_overrides(prose_bytes, tmp_path / "fsdp", parallel__backend="fsdp",
                                                         parallel__vocab_table="sharded", **common)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    one = subprocess.run([sys.executable, *worker, "0", *tiny_overrides(prose_bytes, tmp_path / "one", **common)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    sharded, single = details(tmp_path / "fsdp"), details(tmp_path / "one")
    assert [r["step"] for r in sharded] == [r["step"] for r in single] == [3, 6]
    for a, b in zip(sharded, single):
        numbers = [k for k, v in b.items() if isinstance(v, float)]
        assert len(numbers) > 50 and set(numbers) == {k for k, v in a.items() if isinstance(v, float)}
        for k in numbers:
            if "attn.k.bias" in k:  # its gradient is 0 in exact arithmetic (softmax ignores a shift shared
                continue            # by all keys): its norms and Adam's update of it are rounding noise
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-7), k
    traces = [e for e in events_of(tmp_path / "fsdp") if e["event"] == "trace"]
    assert len(traces) == 1 and traces[0]["step"] == 2
    assert traces[0]["module"] == "blocks.1.mlp" and traces[0]["rank"] == 1
