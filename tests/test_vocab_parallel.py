"""The token lookup and the head computed on the table's shards (parallel.vocab_table=sharded,
bigtrain/parallel/vocab_parallel.py) on 3 real CPU processes (gloo) against the whole table.

Vocabularies that FSDP2's chunks split unevenly (10 over 3 ranks: 4, 4, 2 rows) and that
leave a rank without rows (4: 2, 2, 0); fp32, and bf16 compute on an fp32 table as FSDP's
mixed precision runs it. Every output and gradient is compared with a float64 computation
on the whole table and the whole batch (tests/vocab_worker.py). End-to-end training with
the sharded table against one process is in tests/test_distributed.py (fsdp+sharded).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bigtrain.config import ConfigError, load_config
from bigtrain.parallel.fsdp import vocab_sharded
from bigtrain.parallel.tp import check_tp
from bigtrain.parallel.vocab_parallel import pays
from helpers import REPO, free_port, rank_env

WORKER = str(Path(__file__).resolve().parent / "vocab_worker.py")


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> list[list[dict]]:
    out = tmp_path_factory.mktemp("vocab")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "3", "--master-addr",
                        "127.0.0.1", "--master-port", str(free_port()), WORKER, str(out)],
                       cwd=REPO, env=rank_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(3)]


def test_shards_split_like_fsdp(cases):
    assert [[c["local_rows"] for c in rank] for rank in cases] == [[4, 2, 13], [4, 2, 13], [2, 0, 11]]


@pytest.mark.parametrize("i", [0, 1], ids=["vocab10", "vocab4-a-rank-without-rows"])
def test_fp32_outputs_and_gradients_equal_the_whole_tables(cases, i):
    for rank in cases:
        c = rank[i]
        assert c["rows"] == 0.0  # a lookup: the rows themselves, summed with zeros
        assert c["logits_shape"] == [2, 5, c["vocab"]]
        for key in ("logits", "x_grad", "table_grad"):
            assert c[key] < 1e-6, key


def test_bf16_compute_on_an_fp32_table(cases):
    for rank in cases:
        c = rank[2]
        assert c["rows_dtype"] == "torch.bfloat16" and c["rows"] == 0.0  # the bf16 cast of the fp32 rows
        for key in ("logits", "x_grad", "table_grad"):
            assert c[key] < 1e-2, key  # bf16 keeps 8 bits: ~4e-3 relative


def test_auto_uses_the_shards_where_the_exchange_is_smaller(tmp_path):
    # gpt2-350m, 4 ranks, micro-batches of one 128-token row: the exchange is ~9% of the table
    assert pays(4, 128, 50257, 1024)
    assert not pays(8, 16 * 1024, 50257, 768)  # gpt2-124m's usual micro-batch on 8 GPUs: gather
    assert not pays(1, 8, 50257, 768)          # one rank: nothing to shard
    def cfg(*extra):
        return load_config(overrides=["parallel.backend=fsdp", "model.preset=gpt2-350m", "model.seq_len=128",
                                      "batch.micro_size=1", "batch.global_size=4", *extra])
    assert vocab_sharded(cfg(), 4)
    assert not vocab_sharded(cfg("parallel.vocab_table=gather"), 4)
    assert not vocab_sharded(cfg("batch.micro_size=64", "batch.global_size=256"), 4)
    assert vocab_sharded(cfg("batch.micro_size=64", "batch.global_size=256", "parallel.vocab_table=sharded"), 4)


@pytest.mark.parametrize("extra, message", [
    (["parallel.backend=deepspeed"], "needs parallel.backend=fsdp and parallel.tp=1 (got backend deepspeed, tp 1)"),
    (["parallel.backend=fsdp", "parallel.tp=2"], "needs parallel.backend=fsdp and parallel.tp=1 (got backend fsdp, tp 2)"),
])
def test_sharded_outside_fsdp_at_tp1_is_refused(extra, message):
    cfg = load_config(overrides=["parallel.vocab_table=sharded", *extra])
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_tp(cfg, 4)
