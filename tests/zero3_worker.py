"""What DeepSpeed ZeRO-3 keeps gathered once a forward is done, for tests/test_zero3.py.

    torchrun --nproc-per-node 2 tests/zero3_worker.py OUT

Builds a bf16 ZeRO-3 backend the way the trainer does, takes one step (so DeepSpeed has
traced the module order it prefetches and releases by), then counts the elements of every
parameter still gathered (``ds_status`` AVAILABLE, persistent vectors aside) when the next
forward returns, and writes them with the model's block and table sizes to OUT/rank<r>.json.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

from bigtrain.config import load_config
from bigtrain.data.loader import Batch
from bigtrain.model.gpt import GPT
from bigtrain.parallel.backend import build_backend
from bigtrain.parallel.env import fail_fast, init_distributed, shutdown


def main() -> None:
    out = Path(sys.argv[1])
    cfg = load_config(overrides=["model.n_layer=6", "model.d_model=256", "model.n_head=4", "model.vocab_size=8192",
                                 "model.seq_len=32", "batch.global_size=2", "batch.micro_size=1",
                                 "parallel.backend=deepspeed", "parallel.zero_stage=3", "parallel.precision=bf16",
                                 "parallel.device=cpu"])
    env = init_distributed("cpu", group=True)
    with fail_fast(env):
        torch.manual_seed(cfg.seed)
        backend = build_backend(GPT(cfg.model), cfg, env)
        rows = torch.randint(cfg.model.vocab_size, (2, cfg.model.seq_len + 1), generator=torch.Generator().manual_seed(0))
        batch = Batch(0, 2, np.arange(2), np.arange(2), rows[env.rank::env.world])
        backend.measure(batch, 1)
        backend.update(cfg.optim.lr, cfg.optim.grad_clip)
        model, seen = backend.raw_model, {}

        def after_forward(module, inputs, output):
            seen["gathered"] = sum(p.ds_numel for p in model.parameters()
                                   if p.ds_status == ZeroParamStatus.AVAILABLE and not getattr(p, "ds_persist", False))
        model.register_forward_hook(after_forward)
        backend.measure(batch, 1)
        record = {"gathered_after_forward": seen["gathered"], "total": sum(p.ds_numel for p in model.parameters()),
                  "block": sum(p.ds_numel for p in model.blocks[0].parameters()),
                  "table": cfg.model.vocab_size * cfg.model.d_model}
        (out / f"rank{env.rank}.json").write_text(json.dumps(record))
    shutdown()


if __name__ == "__main__":
    main()
