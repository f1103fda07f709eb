"""The training loop.

:meth:`Trainer.train_step` is the recipe: run every micro-batch forward and
backward, reduce the loss over ranks, measure the global gradient norm, let the
stability policy judge the step, then clip and update, or skip. Everything else
(which samples a step reads, how the model is sharded, when to checkpoint, what
to log) lives in its own module and is wired together in :meth:`Trainer.__init__`.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from bigtrain.checkpoint import Checkpointer
from bigtrain.config import Config, ConfigError, save_config
from bigtrain.data.loader import Batch, BatchLoader
from bigtrain.data.order import SampleOrder, batch_size_at
from bigtrain.data.splits import check_world, open_splits
from bigtrain.faults import Faults
from bigtrain.health import Health
from bigtrain.ledger import Ledger
from bigtrain.metrics import MetricsLogger, peak_flops
from bigtrain.model.gpt import GPT
from bigtrain.optim import lr_at
from bigtrain.parallel.backend import build_backend
from bigtrain.parallel.env import DistEnv, seed_everything
from bigtrain.signals import StopRequest
from bigtrain.stability.guard import Guard


@dataclass
class TrainState:
    """Where the run is. ``position`` is in the global sample stream; ``samples`` counts
    samples trained on (it drives ramp-up); both are saved in every checkpoint."""
    step: int = 0
    position: int = 0
    samples: int = 0
    tokens: int = 0


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv, splits=None):
        self.cfg, self.env = cfg, env
        check_world(cfg, env.world)
        self.data, self.train_split, self.val_split = splits or open_splits(cfg)
        if cfg.model.vocab_size != self.data.vocab_size:
            raise ConfigError(f"config error: model.vocab_size={cfg.model.vocab_size} does not match "
                              f"the data's tokenizer ({self.data.vocab_size}); use vocab_size: auto")
        self.run_dir = Path(cfg.run_dir)
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        env.barrier()

        if cfg.parallel.deterministic:
            torch.use_deterministic_algorithms(True)
        seed_everything(cfg.seed)  # same init on every rank
        self.model = GPT(cfg.model)
        # sized before the backend shards it (ZeRO-3 leaves empty placeholders behind)
        n_params, n_body = self.model.num_params(), self.model.num_params(non_embedding=True)
        self.flops_per_token = self.model.flops_per_token()
        torch.manual_seed(cfg.seed + 1000 * (env.rank + 1))  # per-rank dropout from here on
        self.backend = build_backend(self.model, cfg, env)

        self.state = TrainState()
        self.order = SampleOrder(self.train_split.num_samples(cfg.model.seq_len), cfg.seed)
        self.loader = BatchLoader(self.train_split, self.order, cfg.model.seq_len, env.rank, env.world,
                                  env.device, cfg.data.prefetch)
        self.peak = peak_flops(env.device, cfg.parallel.precision) * env.world
        self.metrics = MetricsLogger(str(self.run_dir), env.is_main, cfg.logging.tensorboard,
                                     cfg.logging.progress, cfg.schedule.max_steps, self.state.step)
        self.ledger = Ledger(self.run_dir, env.is_main)
        self.ledger.tb = self.metrics.tb
        self.guard = Guard(cfg.stability, env, self.ledger)
        self.health = Health(cfg, env, self.backend, self.metrics, self.ledger)  # detail metrics, NaN tracing
        self.faults = Faults(cfg, env.rank, env.world)
        self.checkpointer = Checkpointer(cfg, env)
        self.stop = StopRequest(self.run_dir, env)    # from here on SIGTERM/SIGUSR1 only set a flag
        self.metrics.text(f"bigtrain: {n_params / 1e6:.2f}M parameters ({n_body / 1e6:.2f}M non-embedding), "
                          f"backend={self.backend.name}, world={env.world}, device={env.device}, "
                          f"precision={cfg.parallel.precision}")
        if self.faults.describe():
            self.metrics.text(self.faults.describe())

    # ------------------------------------------------------------------ the recipe
    def batch_size(self, samples: int) -> int:
        return batch_size_at(samples, self.cfg.batch)

    def train_step(self, batch: Batch) -> dict:
        cfg, backend, step = self.cfg, self.backend, self.state.step + 1
        stats = backend.measure(batch, cfg.batch.micro_size,
                                after_backward=lambda b: self.faults.corrupt_grads(step, b))
        verdict = self.guard.judge(stats.loss, stats.grad_norm, stats.local_nonfinite)  # the same on every rank
        lr = lr_at(self.state.step, batch.size, cfg)
        clip = 1.0
        if verdict.apply:
            clip = backend.update(lr, cfg.optim.grad_clip)
        else:
            backend.discard()
        return {"loss": stats.loss, "grad_norm": stats.grad_norm, "lr": lr, "batch_size": batch.size,
                "clipped": clip < 1.0, "verdict": verdict.kind}

    # ------------------------------------------------------------------ the loop
    def fit(self) -> TrainState:
        cfg, state = self.cfg, self.state
        self.checkpointer.resume(self)                # per checkpoint.resume (auto: the newest committed)
        self.backend.train()
        window = {"t0": time.perf_counter(), "tokens": 0, "clipped": 0, "steps": 0}
        while state.step < cfg.schedule.max_steps:
            size = self.batch_size(state.samples)
            batch = self.faults.corrupt_batch(
                self.loader.get(state.position, size, self.batch_size(state.samples + size)))
            self.health.before_step(state.step + 1)   # detail steps only: snapshot params, attach hooks
            result = self.train_step(batch)
            self.health.after_step(state.step + 1, batch, result)  # log details; trace a non-finite step
            state.step += 1
            state.position = batch.next_position
            state.samples += batch.size
            state.tokens += batch.size * cfg.model.seq_len
            window["tokens"] += batch.size * cfg.model.seq_len
            window["clipped"] += result["clipped"]
            window["steps"] += 1
            if state.step % cfg.logging.every == 0 or state.step == cfg.schedule.max_steps:
                self.log_train(result, window)
            if self.guard.after_step(self, batch):
                continue  # rolled back: the state is the checkpoint's
            self.faults.crash_at(state.step)          # test hook (off by default): kill -9 here
            if cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0:
                self.checkpointer.save(self)
            if cfg.eval.every and state.step % cfg.eval.every == 0:
                self.evaluate()
            if reason := self.stop.requested():      # SIGTERM, SIGUSR1 or RUN_DIR/STOP, on any rank
                self.stop.preempt(self, reason)       # checkpoint, ledger "preempt", exit 0; resume continues
                return state
        if not (cfg.eval.every and state.step % cfg.eval.every == 0):
            self.evaluate()
        self.checkpointer.save(self)                  # the end of training is always committed
        self.checkpointer.wait()
        return state

    def train_state(self) -> dict:
        """What a checkpoint holds besides weights and optimizer: where the run is in the
        data, the skip ledger, and the stability guard's memory (so a resumed run decides alike)."""
        state = {**asdict(self.state), "skips": self.order.skips}
        if hasattr(self, "guard"):
            state["guard"] = self.guard.state_dict()
        return state

    def load_train_state(self, state: dict) -> None:
        """Inverse of :meth:`train_state`. Skip ranges are added to the live ledger: it only
        ever grows, so the checkpoint's ranges are already in it or it is empty."""
        for f in fields(TrainState):
            setattr(self.state, f.name, int(state[f.name]))  # in place: fit() holds this object
        for start, end in state["skips"]:
            self.order.add_skip(start, end)
        if hasattr(self, "guard") and "guard" in state:
            self.guard.load_state_dict(state["guard"])

    def log_train(self, result: dict, window: dict) -> None:
        if self.env.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - window["t0"]
        tokens_per_s = window["tokens"] / max(elapsed, 1e-9)
        record = {"loss": result["loss"], "lr": result["lr"], "grad_norm": result["grad_norm"],
                  "clip_rate": window["clipped"] / window["steps"], "tokens_per_s": tokens_per_s,
                  "mfu": self.flops_per_token * tokens_per_s / self.peak,
                  "samples": self.state.samples, "tokens": self.state.tokens, "verdict": result["verdict"],
                  "batch_size": result["batch_size"], **self.guard.counters()}
        if self.env.device.type == "cuda":
            record["memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        self.metrics.scalars(self.state.step, record)
        window.update(t0=time.perf_counter(), tokens=0, clipped=0, steps=0)

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Val loss (token-weighted over ranks) on the first ``eval.batches`` global
        batches of the val split, in order: the same samples at every eval."""
        cfg = self.cfg
        if self.val_split is None or cfg.eval.batches == 0:
            return None
        seq, world, micro = cfg.model.seq_len, self.env.world, cfg.batch.micro_size
        n = min(self.val_split.num_samples(seq), cfg.eval.batches * cfg.batch.global_size)
        n -= n % world
        if n == 0:
            return None
        self.backend.train(False)
        mine = torch.arange(n)[self.env.rank::world].numpy()
        total = torch.zeros((), device=self.env.device)
        for i in range(0, len(mine), micro):
            rows = torch.from_numpy(self.val_split.batch(mine[i:i + micro], seq)).to(self.env.device)
            total += self.backend.eval_loss_sum(rows[:, :-1], rows[:, 1:])
        self.backend.train(True)
        val_loss = float(self.backend.mean_over_ranks(total / (len(mine) * seq)))
        self.metrics.scalars(self.state.step, {"val_loss": val_loss,
                                               "val_ppl": math.exp(min(val_loss, 50))}, prefix="eval")
        return val_loss

    def close(self) -> None:
        self.stop.close()
        self.loader.close()
        self.metrics.close()
