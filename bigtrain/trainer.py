"""The training loop, as a recipe.

:meth:`Trainer.train_step` is one step: the backend measures the batch's loss and
gradient norm, the guard judges them, and the update is applied or discarded.
:meth:`Trainer.fit` is the loop around it: read the next batch, step, carry out
what the guard decided (go on, roll back, abort), checkpoint, evaluate, stop when
asked. The policies live in their own modules and are wired together in
:meth:`Trainer.__init__`: which samples a step reads (``data.order``), how the
model is sharded (``parallel``), checkpoints (``checkpoint``), what is anomalous
(``stability.detector``), what to do about it (``stability.guard``) and how
(``stability.recovery``).

Nothing inside a step is read by the host (no device sync on CUDA): the verdict, the skip
and the clip are decided on the device, and the host learns a step's numbers one step
later (:mod:`bigtrain.inflight`), or at once on the steps whose host work needs them
(logging, checkpoints, evaluation, detail metrics). Only then does the guard record the
verdict and decide about rollbacks: a skipped update was never applied, so deciding a
step late costs nothing but that step's compute.
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from bigtrain.checkpoint import Checkpointer
from bigtrain.config import Config, ConfigError, save_config
from bigtrain.data.loader import Batch, BatchLoader
from bigtrain.data.order import batch_size_at, run_order
from bigtrain.data.splits import check_world, open_splits
from bigtrain.evaluation import Evaluator
from bigtrain.ema import attach_ema
from bigtrain.faults import Faults
from bigtrain.health import Health
from bigtrain.hf_import import open_weights
from bigtrain.host_memory import keep_freed_host_memory
from bigtrain.inflight import InFlight, to_device
from bigtrain.ledger import Ledger
from bigtrain.metrics import MetricsLogger
from bigtrain.model.gpt import GPT
from bigtrain.optim import lr_at
from bigtrain.parallel.backend import build_backend
from bigtrain.peak import peak_flops
from bigtrain.parallel.env import DistEnv, seed_everything
from bigtrain.phases import phase
from bigtrain.profiling import StepProfiler
from bigtrain.rundir import open_run_dir
from bigtrain.signals import StopRequest
from bigtrain.source_metrics import SourceLoss
from bigtrain.stability.culprits import culprit_policy
from bigtrain.stability.guard import GO_ON, ROLLBACK, Decision, Guard, StabilityAbort, StepVerdict
from bigtrain.stability.recovery import AbortMark, roll_back, rollback_target, skip_window
from bigtrain.wandb_sink import WandbSink


@dataclass
class TrainState:
    """Where the run is; saved in every checkpoint. ``step`` counts steps taken, skipped ones
    included (``schedule.max_steps`` counts these: batches consumed); ``updates`` counts the
    updates applied, which the LR schedule follows (a skipped step does not advance it, as in
    Megatron); the loop counts them when it learns the step's verdict. ``position`` is in the
    global sample stream; ``samples`` drives ramp-up."""
    step: int = 0
    updates: int = 0
    position: int = 0
    samples: int = 0
    tokens: int = 0

    def advance(self, batch: Batch, seq_len: int) -> None:
        self.step += 1
        self.position = batch.next_position
        self.samples += batch.size
        self.tokens += batch.size * seq_len

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for f in fields(self):
            setattr(self, f.name, int(state[f.name]))  # in place: fit() holds this object


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv, splits=None):
        check_world(cfg, env.world)
        env = env.with_tp(cfg.parallel.tp)  # a (dp, tp) layout: data goes by dp rank (parallel/tp.py)
        self.cfg, self.env = cfg, env
        self.data, self.train_split, self.val_split = splits or open_splits(cfg)
        if cfg.model.init_from:  # the weights and the data checked against each other before any write
            open_weights(cfg, self.data)
        if cfg.model.vocab_size != self.data.vocab_size:
            raise ConfigError(f"config error: model.vocab_size={cfg.model.vocab_size} does not match "
                              f"the data's tokenizer ({self.data.vocab_size}); use vocab_size: auto")
        if cfg.model.doc_mask and cfg.model.eot_id != self.data.eot_id:
            raise ConfigError(f"config error: model.eot_id={cfg.model.eot_id} but the data ends documents with "
                              f"token {self.data.eot_id}; use eot_id: auto")
        self.run_dir = Path(cfg.run_dir)
        self.run = open_run_dir(self.run_dir, env)  # one writer: RUN_DIR/LOCK, before anything is written

        if cfg.parallel.deterministic:
            torch.use_deterministic_algorithms(True)
        if cfg.parallel.keeps_host_memory(env.device.type):
            keep_freed_host_memory()  # before the model: every later step reuses its memory
        seed_everything(cfg.seed)
        with torch.device("meta"):  # no storage: the backend materialises this rank's shards (model/init.py)
            self.model = GPT(cfg.model)
        # sized before the backend shards it (ZeRO-3 leaves empty placeholders behind)
        n_params, n_body = self.model.num_params(), self.model.num_params(non_embedding=True)
        self.flops_per_token = self.model.flops_per_token()
        # per-rank dropout from here on (under tp too: every dropout is in a split region, parallel/tp.py)
        torch.manual_seed(cfg.seed + 1000 * (env.rank + 1))
        self.backend = build_backend(self.model, cfg, env)  # initial weights: model/init.py's initial_weights
        self.model = self.backend.raw_model  # ZeRO-3 rebuilds it, partitioned
        self.ema = attach_ema(self.backend, cfg.ema, env.device)  # None unless ema.decay > 0
        self.evaluator = Evaluator(cfg, env, self.backend, self.val_split)

        self.state = TrainState()
        self.order = run_order(cfg, self.data, self.train_split, lambda: self.state.position)
        self.loader = BatchLoader(self.train_split, self.order, cfg.model.seq_len, env.dp_rank, env.dp_size,
                                  env.device, cfg.data.prefetch)
        peak = peak_flops(env.device, cfg.parallel.precision)  # one device's; MFU is over the world
        self.peak = peak.flops * env.world
        self.metrics = MetricsLogger(str(self.run_dir), env.is_main, cfg.logging.tensorboard,
                                     cfg.logging.progress, cfg.schedule.max_steps, self.state.step,
                                     wandb=WandbSink(cfg, self.run_dir) if cfg.logging.wandb and env.is_main else None)
        self.ledger = Ledger(self.run_dir, env.is_main)
        self.ledger.tb = self.metrics.tb
        self.ledger.wandb = self.metrics.wandb
        self.order.on_change = self.mixture_changed
        self.source_loss = SourceLoss(getattr(self.train_split, "names", []), self.order, self.backend,
                                      cfg.model.seq_len)  # mixtures: loss/<name>
        self.guard = Guard(cfg.stability, env, self.ledger)
        self.skip_policy = skip_window if cfg.stability.skip == "window" else culprit_policy(  # what a rollback skips
            self.backend, env, self.order, self.train_split, cfg.model.seq_len, cfg.batch.micro_size, self.ledger)
        self.protected_for: int | None = None         # the episode whose rollback target is pinned
        self.inflight: deque[InFlight] = deque()      # steps whose values the host has not read yet
        self.settled: dict = {}                       # the host's numbers of the newest step read
        self.aborted = AbortMark(cfg, env)
        self.health = Health(cfg, env, self.backend, self.metrics, self.ledger)  # detail metrics, NaN tracing
        self.faults = Faults(cfg, env)
        self.checkpointer = Checkpointer(cfg, env, self.metrics.text, before_commit=self.faults.crash_in_checkpoint)
        self.stop = StopRequest(self.run_dir, env)    # from here on SIGTERM/SIGUSR1 only set a flag
        self.profiler = StepProfiler(cfg.profile.steps, self.run_dir, env.rank, env.device)  # profile.steps
        self.metrics.text(f"bigtrain: {n_params / 1e6:.2f}M parameters ({n_body / 1e6:.2f}M non-embedding), "
                          f"backend={self.backend.name}, world={env.world}, device={env.device}, "
                          f"precision={cfg.parallel.precision}")
        self.metrics.text(f"mfu: peak per device from {peak.source}")
        if cfg.stability.enabled and not cfg.checkpoint.every:
            self.metrics.text("stability: checkpoint.every=0 keeps no checkpoint to roll back to: an episode of "
                              f"{cfg.stability.max_consecutive} anomalous steps will abort the run "
                              "(set checkpoint.every to let the guard roll back)")
        if self.faults.describe():
            self.metrics.text(self.faults.describe())
        for line in self.run.notes:                 # a stale lock taken over, a log's partial line dropped
            self.metrics.text(line)

    def parts(self) -> dict:
        """What a checkpoint holds (besides each rank's RNG, which the checkpointer adds). They load
        in this order: "train" before "order", whose changed mixture weights start at the loaded position."""
        return {"model": self.backend, "train": self.state, "order": self.order, "guard": self.guard}

    # ------------------------------------------------------------------ the recipe
    def batch_size(self, samples: int) -> int:
        return batch_size_at(samples, self.cfg.batch)

    def train_step(self, batch: Batch) -> dict:
        """One step, queued without waiting for the device: measure, judge, apply or not.
        Returns 0-d device tensors: ``loss``, ``grad_norm``, ``lr``, ``clip`` (the clip factor,
        1: not clipped), ``applied`` (bool: the update was applied; a hook after the step, such
        as an EMA, takes it as it is) and ``values`` (what the host reads back), with the
        :class:`StepVerdict` ``verdict`` and the host's ``batch_size``."""
        cfg, backend, step = self.cfg, self.backend, self.state.step + 1
        stats = backend.measure(batch, cfg.batch.micro_size, agree=self.stop.codes(),
                                after_backward=lambda b: self.faults.corrupt_grads(step, b))
        with phase("guard"):
            verdict = self.guard.judge(stats.loss, stats.grad_norm, stats.nonfinite)  # the same on every rank
            lr = self.lr_now(batch.size)  # the schedule follows applied updates
        clip = backend.update(lr, cfg.optim.grad_clip, apply=verdict.apply)
        values = torch.cat([verdict.values(), clip.reshape(1), stats.agreed])  # float64, as values() is
        return {"loss": stats.loss, "grad_norm": stats.grad_norm, "lr": lr, "clip": clip, "applied": verdict.apply,
                "verdict": verdict, "values": values, "batch_size": batch.size}

    def lr_now(self, batch_size: int) -> torch.Tensor:
        """``lr_at(updates, batch_size)`` on the device. The host knows the updates applied up to
        the last step it read; each step still in flight adds its apply flag, which only the
        device knows yet: the host sends the candidates, the device picks one."""
        device, done = self.env.device, self.state.updates
        candidates = to_device([lr_at(done + k, batch_size, self.cfg) for k in range(len(self.inflight) + 1)],
                               device)
        pending = sum((f.applied.long() for f in self.inflight), torch.zeros((), dtype=torch.long, device=device))
        return candidates.gather(0, pending.reshape(1)).reshape(())

    def settle(self, keep: int) -> tuple[Decision, str | None]:
        """Read the values of every step in flight but the newest ``keep``, oldest first: count
        the update, log detail metrics or trace a non-finite step (:class:`Health`), let the
        guard record the verdict and decide, and find the stop request every rank agreed on
        (every rank reads the same steps at the same boundary). A decision other than go on
        ends it: later steps belong to a timeline that the rollback (or the abort) ends."""
        decision, reason = Decision(), None
        while len(self.inflight) > keep:
            done = self.inflight.popleft()
            values = done.read()
            verdict = StepVerdict.from_values(values[:StepVerdict.SIZE])
            clip, batch = values[StepVerdict.SIZE], done.batch
            lr = lr_at(self.state.updates, batch.size, self.cfg)  # what the device picked, exactly
            self.state.updates += verdict.apply
            self.window["clipped"] += clip < 1.0
            self.settled = {"step": done.step, "loss": verdict.loss, "grad_norm": verdict.grad_norm, "lr": lr,
                            "clipped": clip < 1.0, "verdict": verdict.kind, "applied": verdict.apply}
            reason = self.stop.reason(values[StepVerdict.SIZE + 1:]) or reason
            if self.health.wants_values(done.step):
                self.health.after_step(done.step, batch, self.settled)  # log details; trace a non-finite step
            decision = self.guard.after_step(done.step, batch.step_position, batch.next_position, batch.size, verdict)
            if decision.action != GO_ON:
                self.inflight.clear()
                break
        return decision, reason

    def needs_values(self, step: int) -> bool:
        """Whether the host work after ``step`` needs that step's own numbers."""
        cfg = self.cfg
        return (step % cfg.logging.every == 0 or step == cfg.schedule.max_steps
                or bool(cfg.checkpoint.every and step % cfg.checkpoint.every == 0)
                or bool(cfg.eval.every and step % cfg.eval.every == 0) or self.health.wants_values(step))

    # ------------------------------------------------------------------ the loop
    def fit(self) -> TrainState:
        cfg, state = self.cfg, self.state
        if refusal := self.aborted.check(self.metrics.text):  # an aborted run stays aborted
            raise StabilityAbort(refusal)
        if resumed := self.checkpointer.resume(self.parts()):  # per checkpoint.resume (auto: the newest)
            self.ledger.record("resume", resumed.step, path=str(resumed.path), passed_over=resumed.passed_over)
        if self.env.is_main:  # only once the checkpoint accepted this config (the data order, the model)
            save_config(cfg, self.run_dir / "config.yaml")
        self.backend.train()
        self.window = {"t0": time.perf_counter(), "tokens": 0, "clipped": 0, "steps": 0}
        while state.step < cfg.schedule.max_steps:
            self.profiler.at(state.step)
            with phase("data"):
                size = self.batch_size(state.samples)
                batch = self.faults.corrupt_batch(
                    self.loader.get(state.position, size, self.batch_size(state.samples + size)))
            self.health.before_step(state.step + 1)   # detail steps only: snapshot params, attach hooks
            with self.source_loss.reading(batch):
                result = self.train_step(batch)
            step = state.step + 1
            if self.ema is not None:
                self.ema.update(step, result["applied"])  # a skipped step leaves it as it was
            self.inflight.append(InFlight.stage(step, batch, result["applied"], result["values"]))
            with phase("guard"):
                decision, stop = self.settle(keep=0 if self.needs_values(step) else 1)
                if stop and decision.action == GO_ON and self.inflight:  # a stop saves this very step
                    decision, _ = self.settle(keep=0)
            state.advance(batch, cfg.model.seq_len)
            self.window["tokens"] += batch.size * cfg.model.seq_len
            self.window["steps"] += 1
            logged = step % cfg.logging.every == 0 or step == cfg.schedule.max_steps
            if logged and self.settled.get("step") == step:  # (not when a rollback dropped this step)
                with phase("log"):
                    self.log_train(batch.size)
            if decision.action != GO_ON:
                self.act_on(decision.episode[-1]["step"], decision)  # roll back (state is the checkpoint's) or raise
            self.protect_rollback_target()
            self.faults.crash_at(step)                # test hook (off by default): kill -9 here
            if decision.action == ROLLBACK:
                continue
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
                with phase("checkpoint"):
                    self.checkpointer.save(step, self.parts())
            if cfg.eval.every and step % cfg.eval.every == 0:
                with phase("eval"):
                    self.evaluate()
            if stop:                                  # SIGTERM, SIGUSR1 or RUN_DIR/STOP, on any rank
                self.preempt(stop)
                return state
        with phase("checkpoint"):
            self.checkpointer.save(state.step, self.parts())  # the end of training is always committed,
        if not (cfg.eval.every and state.step % cfg.eval.every == 0):  # before anything else can fail
            with phase("eval"):
                self.evaluate()
        self.checkpointer.wait()
        self.profiler.close()  # a window that reaches the last step ends with it
        return state

    def act_on(self, step: int, decision: Decision) -> None:
        """Roll back, or abort for good: mark ``RUN_DIR/ABORTED``, raise :class:`StabilityAbort`."""
        if decision.action == ROLLBACK:
            if roll_back(decision, self.checkpointer, self.parts(), self.skip_policy,
                         self.cfg.stability.rollback_margin, self.ledger, self.metrics.text):
                return
            reason = f"no committed checkpoint before step {decision.first_step} to roll back to"
            if not self.cfg.checkpoint.every:
                reason += " (set checkpoint.every to keep rollback targets)"
        else:
            reason = decision.reason
        error = self.guard.abort(step, decision, reason)
        self.aborted.write(step, reason)
        raise error

    def mixture_changed(self, segment: dict) -> None:
        """A resumed (or rolled-back-to) checkpoint had other mixture weights: the new ones start at
        its position. The ``mixture`` event holds the whole history, for ``bigtrain inspect``."""
        self.ledger.record("mixture", self.state.step, names=self.train_split.names, **segment)
        self.metrics.text(f"data: mixture weights {dict(zip(self.train_split.names, segment['weights']))} "
                          f"from stream position {segment['start']} (step {self.state.step})")

    def protect_rollback_target(self) -> None:
        """While an episode is open, retention keeps the checkpoint a rollback would go back to."""
        first = self.guard.open_since
        if first != self.protected_for:
            self.protected_for = first
            self.checkpointer.protect(rollback_target(self.checkpointer, first))

    def preempt(self, reason: str) -> None:
        """Checkpoint the step just finished, record why the run stopped; the caller exits 0."""
        self.checkpointer.save(self.state.step, self.parts())
        self.checkpointer.wait()  # an async save must be committed before the process exits
        self.ledger.record("preempt", self.state.step, reason=reason)
        self.metrics.text(f"bigtrain: stopping at step {self.state.step} ({reason}); "
                          "checkpoint saved, resume with checkpoint.resume=auto")
        self.stop.acted_on()

    def log_train(self, batch_size: int) -> None:
        """Metrics of the newest step (read already: logging steps are read at once) and of the
        window since the last logged step."""
        window, result = self.window, self.settled
        elapsed = time.perf_counter() - window["t0"]
        tokens_per_s = window["tokens"] / max(elapsed, 1e-9)
        record = {"loss": result["loss"], "lr": result["lr"], "grad_norm": result["grad_norm"],
                  "clip_rate": window["clipped"] / window["steps"], "tokens_per_s": tokens_per_s,
                  "mfu": self.flops_per_token * tokens_per_s / self.peak,
                  "samples": self.state.samples, "tokens": self.state.tokens, "verdict": result["verdict"],
                  "batch_size": batch_size, "updates": self.state.updates, **self.guard.counters(),
                  **self.source_loss.collect()}
        if self.env.device.type == "cuda":
            record["memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        self.metrics.scalars(self.state.step, record)
        window.update(t0=time.perf_counter(), tokens=0, clipped=0, steps=0)

    def evaluate(self) -> float | None:
        """Log the val loss (bigtrain/evaluation.py) and, with an EMA, the same under its weights."""
        record = self.evaluator.losses()
        if record is None:
            return None
        if self.ema is not None:
            self.checkpointer.wait()  # an async save may still be copying the tensors the swap writes
            with self.ema.swapped_in(self.backend):
                record["val_loss_ema"] = self.evaluator.losses()["val_loss"]
        record["val_ppl"] = math.exp(min(record["val_loss"], 50))
        self.metrics.scalars(self.state.step, record, prefix="eval")
        return record["val_loss"]

    def close(self) -> None:
        self.profiler.close()  # a run that stopped inside profile.steps still writes its trace
        self.stop.close()
        self.loader.close()
        self.metrics.close()
        self.run.close()
