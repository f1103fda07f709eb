"""What every rank of a tensor-parallel run saw, for tests/test_tp.py to compare with one process.

Launched under torchrun (or as one plain process for the reference). For each
``STYLE=DATA`` it trains the tiny test model with the real :class:`~bigtrain.trainer.Trainer`
in ``OUT/STYLE`` (metrics.jsonl, checkpoints every 5 steps) and writes
``OUT/STYLE/rank<r>.json``: this rank's dp rank, the rows it read at each step and, for
a fresh run, a fingerprint of the initial weights (sum of squares per tensor, gathered whole).

    torchrun --nproc-per-node 4 tests/tp_worker.py OUT gpt2=DATA llama+lp=DATA --backend fsdp --tp 2

STYLE is ``gpt2`` (layernorm, gelu, learned positions, biases, tied head) or ``llama``
(rmsnorm, swiglu, rope, no biases, untied head); ``+lp`` adds ``parallel.loss_parallel`` (at tp > 1),
``+dm`` ``model.doc_mask``, ``+z`` a z-loss of 1e-3.
``--nan-at N`` puts a NaN into the last rank's gradient at step N (``faults.nan_at``);
``--resume PATH`` starts from a checkpoint directory (of another run).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import tiny_config  # noqa: E402

from bigtrain.parallel.env import fail_fast, init_distributed, shutdown  # noqa: E402
from bigtrain.trainer import Trainer  # noqa: E402

STYLES = {
    "gpt2": {},  # the defaults: layernorm, gelu, learned positions, biases, tied embeddings
    "llama": {"model__norm": "rmsnorm", "model__mlp": "swiglu", "model__pos": "rope", "model__bias": False,
              "model__tie_embeddings": False},
}


def run(out: Path, spec: str, data: str, args, env) -> None:
    style, *extra = spec.split("+")
    run_dir = out / style
    cfg = tiny_config(data, run_dir, parallel__backend=args.backend, parallel__tp=args.tp,
                      parallel__loss_parallel="lp" in extra and args.tp > 1, model__doc_mask="dm" in extra,
                      model__z_loss=1e-3 if "z" in extra else 0.0,
                      checkpoint__every=5, batch__micro_size=args.micro_size,
                      checkpoint__resume=args.resume or "never", faults__nan_at=args.nan_at,
                      faults__rank=env.world - 1, **STYLES[style])
    trainer = Trainer(cfg, env)
    record = {"rank": trainer.env.rank, "dp_rank": trainer.env.dp_rank, "rows": []}
    if not args.resume:
        record["init"] = {n: float(p.double().square().sum()) for n, p in trainer.backend.full_parameters().items()}
    take_step = trainer.train_step

    def recorded(batch):
        record["rows"].append(batch.tokens.tolist())
        return take_step(batch)

    trainer.train_step = recorded
    try:
        trainer.fit()
    finally:
        trainer.close()
    (run_dir / f"rank{env.rank}.json").write_text(json.dumps(record))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("specs", nargs="+", help="STYLE=DATA")
    p.add_argument("--backend", default="none")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--nan-at", type=int, action="append", default=[])
    p.add_argument("--resume")
    p.add_argument("--micro-size", type=int, default=4)  # 8 rows over 4 dp ranks need 2
    args = p.parse_args()
    env = init_distributed("cpu", group=args.backend != "none")
    with fail_fast(env):
        for spec in args.specs:
            style, data = spec.split("=", 1)
            run(Path(args.out), style, data, args, env)
    shutdown()


if __name__ == "__main__":
    main()
