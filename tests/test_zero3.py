"""DeepSpeed ZeRO-3 keeps at most two blocks gathered, as FSDP does (bigtrain/parallel/deepspeed.py).

DeepSpeed's defaults keep up to 1e9 parameters live and keep any parameter it will reuse within
1e9: a model smaller than that stays gathered whole on every rank from its forward to its
backward, which is the memory ZeRO-3 exists to save. On 2 real CPU processes (gloo), after the
forward of a traced step: what is still gathered is the tied token table (the head's, needed
again at once by the backward) and at most two blocks, not the model.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers import REPO, free_port, rank_env

WORKER = str(Path(__file__).resolve().parent / "zero3_worker.py")


def test_after_the_forward_zero3_holds_the_table_and_at_most_two_blocks(tmp_path):
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                        "127.0.0.1", "--master-port", str(free_port()), WORKER, str(tmp_path)],
                       cwd=REPO, env={**rank_env(), "DS_ACCELERATOR": "cpu"}, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["total"] > got["table"] + 4 * got["block"]  # the whole model would not pass the bound below
        assert 0 < got["gathered_after_forward"] <= got["table"] + 2 * got["block"], got
