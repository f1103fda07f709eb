"""A training process with a NaN planted in one module, for the anomaly-tracing tests.

``python tests/health_worker.py MODULE STEP RANK key=value ...`` (alone or under torchrun):
trains the configured run, and at 1-based step STEP the output of module MODULE on rank
RANK becomes NaN, as a real overflow inside that module would look from outside.
"""
import sys

import torch

from bigtrain.config import load_config
from bigtrain.parallel.env import init_distributed, shutdown
from bigtrain.trainer import Trainer


def main(module: str, step: int, rank: int, overrides: list[str]) -> None:
    cfg = load_config(overrides=overrides)
    env = init_distributed(cfg.parallel.device)
    trainer = Trainer(cfg, env)

    def poison(mod, args, output):
        return output * float("nan") if trainer.state.step + 1 == step and env.rank == rank else None

    trainer.model.get_submodule(module).register_forward_hook(poison)
    try:
        trainer.fit()
    finally:
        trainer.close()
        shutdown()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:])
