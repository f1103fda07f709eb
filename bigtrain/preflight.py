"""``bigtrain preflight``: the checks practitioners run by hand before a long run.

Each check answers one question a bug would otherwise answer days into training:

* ``data``      does the model read what we think? A few samples of the first global
                batch (from the real :class:`~bigtrain.data.order.SampleOrder`), decoded
                next to their token ids; fails on constant (e.g. zero-filled) samples.
* ``vocab``     do the tokenizer and the model agree on the vocabulary?
* ``params``    how many parameters (total, trainable, non-embedding, frozen), and does
                weight decay hit exactly the matrices (:func:`bigtrain.optim.param_groups`)?
* ``gradients`` does every trainable parameter receive a finite, non-zero gradient? (A
                detached head or a branch cut off from the loss shows up here, by name.)
* ``init_loss`` is the loss at init close to ln(vocab), the loss of a uniform guess? Far
                above: the init scale is off; far below: the targets leak into the inputs.
* ``overfit``   can the model memorise one micro-batch? Loss must fall below a target
                within N steps at the configured LR; a model or optimizer that cannot do
                this will not learn a corpus either.
* ``lr_range``  (optional) an exponential LR sweep (Smith, 2015): smoothed loss per LR, a
                suggested LR (a tenth of the LR at the minimum), and a failure when the
                configured LR is past the point where the loss diverged.

Everything runs in one process, on the configured device, through the same
:class:`~bigtrain.parallel.backend.LocalBackend` and the same step recipe
(``measure`` then ``update``, or ``discard`` for a non-finite step) the trainer uses,
so autocast, micro-batching, clipping and parameter groups are the real ones,
whatever ``parallel.backend`` says;
``parallel.compile`` is turned off because compiling would dominate a few-step check.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch

from bigtrain.config import Config
from bigtrain.data.loader import Batch
from bigtrain.data.order import batch_size_at, run_order
from bigtrain.data.splits import open_splits
from bigtrain.model.gpt import GPT
from bigtrain.optim import batch_scale, param_groups
from bigtrain.parallel.backend import LocalBackend
from bigtrain.parallel.env import DistEnv, pick_device, seed_everything

INIT_LOSS_TOLERANCE = 0.1   # |initial loss - ln V| may be at most this fraction of ln V
DIVERGED = 4.0              # a loss above this x its minimum (LR sweep) or its start (overfit) has diverged


@dataclass
class Check:
    name: str
    status: str                 # pass | fail | skip
    summary: str                # one line with the numbers
    details: dict = field(default_factory=dict)


@dataclass
class PreflightReport:
    checks: list[Check]
    samples: list[dict]

    @property
    def passed(self) -> bool:
        return all(c.status != "fail" for c in self.checks)

    def check(self, name: str) -> Check:
        return next(c for c in self.checks if c.name == name)

    def to_dict(self) -> dict:
        """Plain JSON: a diverged loss is ``null``, not the non-standard ``NaN``."""
        def clean(x):
            if isinstance(x, float) and not math.isfinite(x):
                return None
            if isinstance(x, dict):
                return {k: clean(v) for k, v in x.items()}
            return [clean(v) for v in x] if isinstance(x, list) else x
        return clean({"passed": self.passed, "checks": [asdict(c) for c in self.checks], "samples": self.samples})

    def format(self) -> str:
        lines = ["samples (first global batch, in training order):"]
        for s in self.samples:
            lines.append(f"  position {s['position']} = sample {s['sample']}: ids {s['ids'][:16]}...")
            lines.append(f"    text {s['text'][:120]!r}")
        curve = next((c.details.get("curve") for c in self.checks if c.name == "overfit"), None)
        if curve:
            every = max(1, len(curve) // 10)
            lines.append(f"overfit curve (every {every} steps): "
                         + " ".join(f"{x:.3f}" for x in curve[::every]) + f" ... {curve[-1]:.3f}")
        width = max(len(c.name) for c in self.checks)
        lines.append("")
        lines += [f"  {c.name:<{width}}  {c.status.upper():<4}  {c.summary}" for c in self.checks]
        failed = [c.name for c in self.checks if c.status == "fail"]
        lines.append("preflight passed" if self.passed else f"preflight FAILED: {', '.join(failed)}")
        return "\n".join(lines)


def _fmt(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,}"


def _names(names: list[str], limit: int = 3) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


class Preflight:
    """Holds the data, the first batch and a way to build a fresh model and backend."""

    def __init__(self, cfg: Config, model_fn: Callable[[], GPT] | None = None):
        self.cfg = cfg.model_copy(deep=True)
        self.cfg.parallel.backend, self.cfg.parallel.compile = "none", False
        self.env = DistEnv(rank=0, world=1, local_rank=0, device=pick_device(cfg.parallel.device, 0))
        self.model_fn = model_fn or (lambda: GPT(self.cfg.model))
        self.data, self.split, _ = open_splits(self.cfg)
        self.order = run_order(self.cfg, self.data, self.split)  # a mixture's too
        self.global_size = batch_size_at(0, self.cfg.batch)
        positions, _ = self.order.next_batch(0, self.global_size)
        self.positions, self.samples = positions, self.order.sample_at(positions)
        self.first = self.batch_at(self.positions[:self.cfg.batch.micro_size])  # what overfit memorises
        self.lr = self.cfg.optim.lr * batch_scale(self.global_size, self.cfg)

    def fresh(self) -> LocalBackend:
        """The model at its seeded init, on the device, with the run's optimizer."""
        seed_everything(self.cfg.seed)
        return LocalBackend(self.model_fn(), self.cfg, self.env)

    def batch_at(self, positions: np.ndarray) -> Batch:
        """The rows at stream ``positions`` of the run's order, on the device, as one step reads them."""
        samples = self.order.sample_at(positions)
        rows = torch.from_numpy(self.split.batch(samples, self.cfg.model.seq_len)).to(self.env.device)
        return Batch(int(positions[0]), int(positions[-1]) + 1, positions, samples, rows)

    def train_step(self, backend: LocalBackend, batch: Batch, lr: float) -> tuple[float, float]:
        """One update of the trainer's recipe on ``batch`` (a non-finite step is not applied, as
        the guard would); returns (loss, pre-clip grad norm)."""
        stats = backend.measure(batch, self.cfg.batch.micro_size)
        backend.update(lr, self.cfg.optim.grad_clip, apply=~stats.nonfinite)
        return float(stats.loss), float(stats.grad_norm)

    # ------------------------------------------------------------------ the checks
    def check_data(self, count: int) -> tuple[Check, list[dict]]:
        tok, shown = self.data.tokenizer, []
        rows = self.split.batch(self.samples[:count], self.cfg.model.seq_len)
        for pos, sample, ids in zip(self.positions[:count], self.samples[:count], rows):
            shown.append({"position": int(pos), "sample": int(sample), "ids": ids.tolist(),
                          "text": tok.decode(ids.tolist())})
        constant = [s["position"] for s in shown if len(set(s["ids"])) == 1]
        distinct = len({i for s in shown for i in s["ids"]})
        if constant:
            return Check("data", "fail", f"samples at positions {constant} hold a single repeated token: "
                                         "the shards may be empty or zero-filled", {"distinct_tokens": distinct}), shown
        return Check("data", "pass", f"{len(shown)} samples decoded, {distinct} distinct token ids, "
                                     f"{self.order.num_samples:,} samples of {self.cfg.model.seq_len + 1} tokens",
                     {"distinct_tokens": distinct, "num_samples": self.order.num_samples}), shown

    def check_vocab(self) -> Check:
        model_v, data_v = self.cfg.model.vocab_size, self.data.vocab_size
        top = int(self.first.tokens.max())
        details = {"model": model_v, "tokenizer": data_v, "max_id": top}
        if model_v != data_v:
            return Check("vocab", "fail", f"model.vocab_size={model_v} but the data's tokenizer has {data_v} "
                                          "tokens; use vocab_size: auto", details)
        if top >= model_v:
            return Check("vocab", "fail", f"token id {top} in the data is outside the model's vocabulary "
                                          f"of {model_v}", details)
        return Check("vocab", "pass", f"tokenizer and model agree on {model_v} tokens (max id seen {top})", details)

    def check_params(self, model: GPT) -> Check:
        o = self.cfg.optim
        named = dict(model.named_parameters())
        groups = param_groups(model, o.weight_decay, o.decay_embeddings)
        ids = {g["name"]: {id(p) for p in g["params"]} for g in groups}
        total = sum(p.numel() for p in named.values())
        trainable = sum(p.numel() for p in named.values() if p.requires_grad)
        frozen = [n for n, p in named.items() if not p.requires_grad]
        decay = [n for n, p in named.items() if id(p) in ids["decay"]]
        no_decay = [n for n, p in named.items() if id(p) in ids["no_decay"]]
        details = {"total": total, "trainable": trainable, "non_embedding": model.num_params(non_embedding=True),
                   "frozen": frozen, "decay": decay, "no_decay": no_decay,
                   "decay_params": sum(named[n].numel() for n in decay)}
        summary = (f"total {_fmt(total)}, trainable {_fmt(trainable)}, non-embedding "
                   f"{_fmt(details['non_embedding'])}, frozen {len(frozen)} tensors; weight decay "
                   f"{o.weight_decay} on {len(decay)} tensors ({_fmt(details['decay_params'])}), "
                   f"none on {len(no_decay)}")
        problems = []
        if trainable == 0:
            problems.append("no trainable parameters")
        orphans = [n for n, p in named.items()
                   if p.requires_grad and (id(p) in ids["decay"]) == (id(p) in ids["no_decay"])]
        if orphans:
            problems.append(f"not in exactly one optimizer group: {_names(orphans)}")
        vectors = [n for n in decay if named[n].ndim < 2]
        if vectors:
            problems.append(f"weight decay on biases/norm gains: {_names(vectors)}")
        embeddings = [n for n in decay if "emb" in n.split(".")[-2]] if not o.decay_embeddings else []
        if embeddings:
            problems.append(f"weight decay on embeddings: {_names(embeddings)}")
        return Check("params", "fail" if problems else "pass", "; ".join(problems) or summary, details)

    def check_gradients_and_init_loss(self, backend: LocalBackend) -> list[Check]:
        vocab = self.cfg.model.vocab_size
        inputs, targets = next(self.first.micro_batches(self.cfg.batch.micro_size))
        ce, _ = backend.loss_terms(inputs, targets)
        loss = float(ce.detach()) / targets.numel()
        ln_v = math.log(vocab)
        delta = loss - ln_v
        details = {"loss": loss, "ln_vocab": ln_v, "tokens": targets.numel()}
        if not math.isfinite(loss) or abs(delta) > INIT_LOSS_TOLERANCE * ln_v:
            why = "non-finite" if not math.isfinite(loss) else \
                "too high: the init scale or the logits are off" if delta > 0 else \
                "too low: the targets may leak into the inputs"
            init = Check("init_loss", "fail", f"{loss:.3f} vs ln({vocab}) = {ln_v:.3f} ({delta:+.3f}): {why}", details)
        else:
            init = Check("init_loss", "pass", f"{loss:.3f} vs ln({vocab}) = {ln_v:.3f} ({delta:+.3f}, "
                                              f"within {INIT_LOSS_TOLERANCE:.0%})", details)
        trainable = {n: p for n, p in backend.raw_model.named_parameters() if p.requires_grad}
        if not ce.requires_grad:
            return [Check("gradients", "fail", "the loss does not depend on any trainable parameter "
                                               "(is the head detached?)", {"no_grad": list(trainable), "reached": 0}),
                    init]
        backend.backward(ce / targets.numel(), last=True)
        dead = [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
        bad = [n for n, p in trainable.items() if p.grad is not None and not torch.isfinite(p.grad).all()]
        backend.discard()
        details = {"no_grad": dead, "nonfinite": bad, "reached": len(trainable) - len(dead)}
        if bad:
            grads = Check("gradients", "fail", f"non-finite gradients in {_names(bad)}", details)
        elif dead:
            grads = Check("gradients", "fail", f"{len(dead)} of {len(trainable)} trainable tensors get no "
                                               f"gradient (cut off from the loss): {_names(dead)}", details)
        else:
            grads = Check("gradients", "pass", f"all {len(trainable)} trainable tensors get finite, "
                                               "non-zero gradients", details)
        return [grads, init]

    def check_overfit(self, backend: LocalBackend, steps: int, target: float) -> Check:
        """Memorise the first micro-batch at the configured LR, after a warmup of 10% of the steps.
        Stops early once the loss is below ``target``, or has diverged (non-finite, or above
        ``DIVERGED`` x its initial value after the warmup)."""
        warmup = max(1, steps // 10)
        curve: list[float] = []
        for step in range(steps):
            loss, _ = self.train_step(backend, self.first, self.lr * min(1.0, (step + 1) / warmup))
            curve.append(loss)
            diverged = not math.isfinite(loss) or (step >= warmup and loss > DIVERGED * curve[0])
            if diverged or loss < target:
                break
        final = curve[-1]
        details = {"curve": curve, "target": target, "lr": self.lr, "steps": len(curve)}
        head = f"{curve[0]:.3f} -> {final:.3f}"
        if final < target:
            return Check("overfit", "pass", f"{head} < {target:.3f} in {len(curve)} steps at lr {self.lr:.2e}",
                         details)
        why = "diverged: lower the LR" if diverged else "lower the LR or check the model/optimizer"
        return Check("overfit", "fail", f"{head} after {len(curve)} steps at lr {self.lr:.2e}, target < "
                                        f"{target:.3f}: {why}", details)

    def check_lr_range(self, backend: LocalBackend, steps: int, lr_min: float, lr_max: float) -> Check:
        """Exponential sweep over successive micro-batches of the global order, one update per LR."""
        micro = self.cfg.batch.micro_size
        positions, _ = self.order.next_batch(0, steps * micro)
        lrs, smooth, avg, beta, diverged_at = [], [], 0.0, 0.9, None
        for i in range(steps):
            lr = lr_min * (lr_max / lr_min) ** (i / max(1, steps - 1))
            loss, _ = self.train_step(backend, self.batch_at(positions[i * micro:(i + 1) * micro]), lr)
            avg = beta * avg + (1 - beta) * loss
            if not math.isfinite(avg) or (smooth and avg / (1 - beta ** (i + 1)) > DIVERGED * min(smooth)):
                diverged_at = lr
                break
            lrs.append(lr)
            smooth.append(avg / (1 - beta ** (i + 1)))  # bias-corrected EMA
        if len(smooth) < 2:
            return Check("lr_range", "fail", f"the loss diverged from the start of the sweep ({lr_min:.1e})", {})
        best = min(range(len(smooth)), key=smooth.__getitem__)
        suggested = lrs[best] / 10
        details = {"lrs": lrs, "smoothed_loss": smooth, "lr_at_min": lrs[best], "suggested_lr": suggested,
                   "diverged_at": diverged_at, "configured_lr": self.lr}
        where = f"diverged at {diverged_at:.2e}" if diverged_at else f"no divergence up to {lr_max:.1e}"
        summary = f"suggested lr {suggested:.2e} (min loss {smooth[best]:.3f} at {lrs[best]:.2e}), {where}"
        if diverged_at is not None and self.lr >= diverged_at:
            return Check("lr_range", "fail", f"configured lr {self.lr:.2e} is past where the loss diverged "
                                             f"({diverged_at:.2e}); {summary}", details)
        return Check("lr_range", "pass", f"{summary}; configured {self.lr:.2e}", details)


def run_preflight(cfg: Config, *, num_samples: int = 3, overfit_steps: int = 150, overfit_target: float = 0.1,
                  lr_range: bool = False, lr_range_steps: int = 100, lr_min: float = 1e-6, lr_max: float = 10.0,
                  model_fn: Callable[[], GPT] | None = None) -> PreflightReport:
    """Run every check and return the report. ``overfit_target`` is a fraction of ln(vocab):
    the one-batch loss must fall below it. ``model_fn`` builds the model (tests use it to
    break one on purpose); by default ``GPT(cfg.model)`` at the run's seed."""
    pf = Preflight(cfg, model_fn)
    data, samples = pf.check_data(num_samples)
    checks = [data, pf.check_vocab()]
    backend = pf.fresh()
    checks.append(pf.check_params(backend.raw_model))
    sweep = ("lr_range",) if lr_range else ()
    if cfg.model.vocab_size < pf.data.vocab_size or checks[1].details["max_id"] >= cfg.model.vocab_size:
        skipped = [Check(name, "skip", "skipped: the data has ids the model cannot embed")
                   for name in ("gradients", "init_loss", "overfit", *sweep)]
        return PreflightReport(checks + skipped, samples)
    grads, init = pf.check_gradients_and_init_loss(backend)
    checks += [grads, init]
    if grads.details["reached"] == 0:
        skipped = [Check(name, "skip", "skipped: no parameter gets a gradient") for name in ("overfit", *sweep)]
        return PreflightReport(checks + skipped, samples)
    checks.append(pf.check_overfit(backend, overfit_steps, overfit_target * math.log(cfg.model.vocab_size)))
    if lr_range:
        checks.append(pf.check_lr_range(pf.fresh(), lr_range_steps, lr_min, lr_max))
    return PreflightReport(checks, samples)
