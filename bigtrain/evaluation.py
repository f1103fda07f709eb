"""Evaluation: the val loss on the same samples at every eval, per source for a mixture.

An eval reads the first ``eval.batches`` global batches of the val split, in order, so two
evals of one run (or of two runs) compare the same samples. Each rank takes columns
``r::W``; the loss is token-weighted over ranks. A mixture evaluates each source's val
split (``val_loss/<name>``) and reports their mean weighted by the current mixture
weights as ``val_loss``. With an EMA, the trainer runs the same evaluation again under the
averaged weights (``val_loss_ema``).
"""
from __future__ import annotations

import torch

from bigtrain.config import Config
from bigtrain.parallel.env import DistEnv
from bigtrain.source_metrics import eval_sets


class Evaluator:
    def __init__(self, cfg: Config, env: DistEnv, backend, val_split):
        self.cfg, self.env, self.backend, self.val_split = cfg, env, backend, val_split

    def losses(self) -> dict | None:
        """``{"val_loss": ..., "val_loss/<name>": ...}``; None when there is nothing to evaluate."""
        if self.val_split is None or self.cfg.eval.batches == 0:
            return None
        weights = {s.name: s.weight for s in self.cfg.data.sources or []}
        record, total, weight = {}, 0.0, 0.0
        self.backend.train(False)
        try:
            for name, w, split in eval_sets(self.val_split, weights):
                loss = self.split_loss(split)
                if loss is not None and name is not None:
                    record[f"val_loss/{name}"] = loss
                if loss is not None and w > 0:
                    total, weight = total + w * loss, weight + w
        finally:
            self.backend.train(True)
        return {"val_loss": total / weight, **record} if weight else None

    @torch.no_grad()
    def split_loss(self, split) -> float | None:
        """Mean loss on the first ``eval.batches`` global batches of ``split``; None when empty."""
        cfg = self.cfg
        seq, world, micro = cfg.model.seq_len, self.env.dp_size, cfg.batch.micro_size  # a tp group reads alike
        n = min(split.num_samples(seq), cfg.eval.batches * cfg.batch.global_size)
        n -= n % world
        if n == 0:
            return None
        mine = torch.arange(n)[self.env.dp_rank::world].numpy()
        total = torch.zeros((), device=self.env.device)
        for i in range(0, len(mine), micro):
            rows = torch.from_numpy(split.batch(mine[i:i + micro], seq)).to(self.env.device)
            total += self.backend.eval_loss_sum(rows[:, :-1], rows[:, 1:])
        return float(self.backend.mean_over_ranks(total / (len(mine) * seq)))
