"""What every rank saw, for tests/test_distributed.py to compare with one process.

Launched under torchrun (or imported and run in-process as the single-process
reference). For each backend spec it trains the tiny test model with the real
:class:`~bigtrain.trainer.Trainer`, one after another in the same process group,
and writes ``OUT/<spec>/rank<r>.json``: per step the loss and grad norm this
rank computed, the token rows this rank read, the optimizer's step count and a
fingerprint of its moments, and the final full parameters.

    torchrun --nproc-per-node 2 tests/dist_worker.py OUT DATA SPEC [SPEC ...] [--skip N] [--fail-rank R]

SPEC is ``none``, ``fsdp`` or ``deepspeed<stage>``, each with any of ``+ac`` (activation
checkpointing), ``+sharded`` / ``+gather`` (``parallel.vocab_table``) and ``+untied`` (an
untied head). ``--skip N`` makes step N a
skipped step the way the stability guard skips (``Backend.discard`` in place of
``Backend.update``). ``--fail-rank R`` raises on rank R after the group is up.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import tiny_config  # noqa: E402

from bigtrain.parallel.env import DistEnv, fail_fast, init_distributed, shutdown  # noqa: E402
from bigtrain.trainer import Trainer  # noqa: E402


# Micro-batches of 2 and a batch that ramps from 4 to 8 at sample 24 (after step 6): the
# number of micro-batches per step changes, which DeepSpeed's fixed accumulation count cannot
# follow by itself.
RAMPUP = {"start": 4, "increment": 4, "samples": 24}


def spec_overrides(spec: str) -> dict:
    name, *extras = spec.split("+")
    out = {"parallel__activation_checkpointing": "ac" in extras}
    for table in {"sharded", "gather"} & set(extras):  # parallel.vocab_table
        out["parallel__vocab_table"] = table
    if "untied" in extras:
        out["model__tie_embeddings"] = False
    if name.startswith("deepspeed"):
        out |= {"parallel__backend": "deepspeed", "parallel__zero_stage": int(name[len("deepspeed"):])}
    else:
        out["parallel__backend"] = name
    return out


def adam_state(trainer: Trainer) -> tuple[int, float]:
    """(optimizer step count, sum of squares of both Adam moments over all ranks' shards)."""
    opt = trainer.backend.optimizer
    opt = getattr(opt, "optimizer", opt)  # DeepSpeed's ZeRO optimizer wraps a torch AdamW
    steps, sq = 0, torch.zeros(1, dtype=torch.float64)
    for state in opt.state.values():
        steps = max(steps, int(state.get("step", 0)))
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                t = state[key]
                t = t.to_local() if hasattr(t, "to_local") else t
                sq += t.double().square().sum()
    if trainer.cfg.parallel.backend != "none":
        trainer.env.all_reduce(sq)  # shards are disjoint: the sum over ranks is the whole
    return steps, float(sq)


def fingerprint(params: dict[str, torch.Tensor]) -> float:
    return float(sum(p.double().square().sum() + p.double().sum() for p in params.values()))


def train(cfg, env: DistEnv, skip: set[int]) -> dict:
    trainer = Trainer(cfg, env)
    backend, steps = trainer.backend, []
    apply_update = backend.update

    def update(lr, max_norm, apply=None):  # the guard's skip, forced: not applied
        if trainer.state.step + 1 in skip:
            apply = torch.zeros((), dtype=torch.bool)
        return apply_update(lr, max_norm, apply)

    backend.update = update
    take_step = trainer.train_step

    def recorded(batch):
        result = take_step(batch)
        adam_steps, moments = adam_state(trainer)
        steps.append({"loss": float(result["loss"]), "grad_norm": float(result["grad_norm"]),
                      "rows": batch.tokens.tolist(), "adam_steps": adam_steps, "moments": moments,
                      "params": fingerprint(backend.full_parameters())})
        return result

    trainer.train_step = recorded
    try:
        trainer.fit()
    finally:
        trainer.close()
    final = {k: v.flatten().tolist() for k, v in backend.full_parameters().items()}
    return {"rank": env.rank, "world": env.world, "steps": steps, "final": final}


def run(out: str, data: str, specs: list[str], env: DistEnv, skip: set[int] = frozenset()) -> None:
    for spec in specs:
        run_dir = Path(out) / spec
        cfg = tiny_config(data, run_dir, checkpoint__resume="never", eval__batches=0,
                          batch__micro_size=2, batch__rampup=RAMPUP, **spec_overrides(spec))
        record = train(cfg, env, skip)
        (run_dir / f"rank{env.rank}.json").write_text(json.dumps(record))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("data")
    p.add_argument("specs", nargs="+")
    p.add_argument("--skip", type=int, action="append", default=[])
    p.add_argument("--fail-rank", type=int)
    args = p.parse_args()
    env = init_distributed("cpu", group=True)
    with fail_fast(env):
        if env.rank == args.fail_rank:
            raise RuntimeError(f"deliberate failure on rank {env.rank}")
        run(args.out, args.data, args.specs, env, set(args.skip))
    shutdown()


if __name__ == "__main__":
    main()
