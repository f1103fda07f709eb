"""The model's health: detail metrics every ``logging.detail_every`` steps, and anomaly tracing.

The loss and the global gradient norm say *that* training is in trouble; these say
*where*. On a detail step (and only then: other steps pay one modulo) we record

* per parameter tensor: gradient norm, parameter norm, and the update/parameter ratio
  ``||p_after - p_before|| / ||p_before||`` (Karpathy's rule of thumb: around 1e-3 is
  healthy, above 1e-1 the LR is too high for that layer);
* per block: mean, std and max |x| of the block's output (the residual stream);
* the logits' mean, std and max |x|;
* TensorBoard histograms of every parameter, gradient, block output and the logits;
* warnings in the log for vanishing or exploding layers and large update ratios.

How it stays free on other steps: the copy of the parameters, the forward hooks and
an optimizer step pre-hook exist only between :meth:`Health.before_step` and
:meth:`Health.after_step` of a detail step. The gradients are read in the optimizer's
pre-hook, i.e. after clipping; clipping scales every gradient by one factor, so the
pre-clip norm of each tensor is recovered exactly from the step's pre-clip global norm.
A step whose update is skipped has no gradient metrics (and a zero update).

Under FSDP2 the parameters are sharded DTensors: norms are summed from each rank's
local shard and all-reduced once (so a detail step never materialises the model),
histograms gather one tensor at a time with ``full_tensor()`` and keep a strided sample. Every rank takes part;
only rank 0 writes. Scalars go to TensorBoard under ``detail/`` and to
``metrics.jsonl`` as one line with ``"kind": "detail"``.
"""
from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor

from bigtrain.anomaly import AnomalyTracer
from bigtrain.config import Config
from bigtrain.ledger import Ledger
from bigtrain.metrics import MetricsLogger
from bigtrain.parallel.backend import Backend
from bigtrain.parallel.env import DistEnv
from bigtrain.parallel.tp import replicas

UPDATE_RATIO_MAX = 1e-1     # warn above this update/param ratio (weight matrices only: biases start at 0)
VANISHING = 1e-4            # warn when a weight's grad norm is below this x the median weight's ...
EXPLODING = 1e3             # ... or above this x the median, or not finite
ACTIVATION_JUMP = 10.0      # warn when a block's output std changes by this factor from the block before
HISTOGRAM_VALUES = 65536    # histograms are drawn from a strided sample of each tensor this large


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _sample(t: torch.Tensor) -> torch.Tensor:
    """A strided sample of the whole tensor (gathered, if sharded): a histogram of a billion
    values costs seconds on the CPU and shows nothing more than one of 65536."""
    full = (t.full_tensor() if isinstance(t, DTensor) else t).detach().flatten()
    return full[::max(1, full.numel() // HISTOGRAM_VALUES)]


class Health:
    def __init__(self, cfg: Config, env: DistEnv, backend: Backend, metrics: MetricsLogger, ledger: Ledger):
        self.cfg, self.env, self.backend, self.metrics = cfg, env, backend, metrics
        self.every = cfg.logging.detail_every
        self.histograms = cfg.logging.tensorboard  # the same on every rank (metrics.tb is rank 0's only)
        self.tracer = AnomalyTracer(backend, env, ledger, metrics.text, cfg.batch.micro_size) \
            if cfg.stability.trace_anomalies else None
        self.active = False

    def is_detail(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def wants_values(self, step: int) -> bool:
        """Whether :meth:`after_step` must run after ``step`` (with that step's numbers read)."""
        return self.tracer is not None or self.is_detail(step)

    # ------------------------------------------------------------------ around the step
    def before_step(self, step: int) -> None:
        """On a detail step: copy the parameters (local shards) and attach the hooks."""
        if not self.is_detail(step):
            return
        model = self.backend.raw_model
        self.step = step
        self.names, self.params = zip(*model.named_parameters())
        # each rank's part of a sum over ranks: a shard counts whole, a part repeated on k ranks
        # (tensor parallelism: a norm weight on every rank of its tp group) 1/k; a plain tensor on rank 0
        self.share = [1.0 / replicas(p, self.env.world) if isinstance(p, DTensor) else float(self.env.rank == 0)
                      for p in self.params]
        self.before = [_local(p).detach().clone() for p in self.params]
        self.acts: dict[str, list] = {}      # name -> [tensor(sum, sum of squares, count), max |x|, sample]
        self.grad_sq: torch.Tensor | None = None
        self.handles = [block.register_forward_hook(self._activation_hook(f"blocks.{i}"))
                        for i, block in enumerate(model.blocks)]
        # the model's output: the head's module is not called when the table is used on its shards
        self.handles.append(model.register_forward_hook(self._activation_hook("logits")))
        if self.backend.has_local_grads:  # else (DeepSpeed) the step has no per-parameter gradient metrics
            self.handles.append(self.backend.optimizer.register_step_pre_hook(self._grad_hook))
        self.active = True

    def after_step(self, step: int, batch, result: dict) -> None:
        """Trace a non-finite step (when asked to); on a detail step, log and detach the hooks."""
        if self.tracer is not None and result["verdict"] == "nonfinite":
            self.tracer.trace(step, batch)
        if not self.active:
            return
        for h in self.handles:
            h.remove()
        self.active = False
        if not result["applied"]:
            self.grad_sq = None  # the optimizer ran, but skipped the update on the device
        record = {"kind": "detail", "applied": self.grad_sq is not None}
        record.update(self._weights(result))
        record.update(self._activations())
        warnings = self._warnings(record)
        if warnings:
            record["warnings"] = warnings
            for w in warnings:
                self.metrics.text(f"step {step}: warning: {w}")
        self.metrics.scalars(step, record, prefix="detail")
        self.before = self.acts = None

    # ------------------------------------------------------------------ hooks
    def _activation_hook(self, name: str):
        def hook(module, args, output):
            x = output.detach().float()
            stats = torch.stack([x.sum(), x.pow(2).sum(), torch.tensor(float(x.numel()), device=x.device)]).double()
            peak = x.abs().max().double()
            if name in self.acts:
                self.acts[name][0] += stats
                self.acts[name][1] = torch.maximum(self.acts[name][1], peak)
            else:
                self.acts[name] = [stats, peak, _sample(x).cpu() if self.histograms else None]
        return hook

    def _grad_hook(self, optimizer, args, kwargs) -> None:
        """Runs inside ``optimizer.step()``: the gradients are final (reduced and clipped)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        self.grad_sq = self._global_sq([_local(g).detach() for g in grads])
        if self.histograms:
            for name, g in zip(self.names, grads):
                if g.numel():
                    self.metrics.histogram(self.step, f"detail/grad/{name}", _sample(g))

    # ------------------------------------------------------------------ the numbers
    def _global_sq(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """Squared L2 norm of each full tensor, from local shards: sharded entries are summed
        over ranks (each part counted once), replicated ones are taken from rank 0 alone."""
        sq = torch.stack([t.float().pow(2).sum() for t in tensors])
        if self.env.distributed:
            share = torch.tensor(self.share, device=sq.device)
            sq = self.env.all_reduce(torch.where(share > 0, sq * share, torch.zeros_like(sq)))
        return sq

    def _weights(self, result: dict) -> dict:
        out = {}
        param_sq = self._global_sq([_local(p).detach() for p in self.params])
        update_sq = self._global_sq([_local(p).detach() - b for p, b in zip(self.params, self.before)])
        param_norm, update_norm = param_sq.sqrt().tolist(), update_sq.sqrt().tolist()
        before_norm = self._global_sq(self.before).sqrt().tolist()
        grad_norm = None
        if self.grad_sq is not None:
            applied = float(self.grad_sq.sum().sqrt())  # after clipping; the step's norm is before
            scale = result["grad_norm"] / applied if result.get("clipped") and applied > 0 else 1.0
            grad_norm = (self.grad_sq.sqrt() * scale).tolist()
        for i, name in enumerate(self.names):
            out[f"param_norm/{name}"] = param_norm[i]
            out[f"update_ratio/{name}"] = update_norm[i] / before_norm[i] if before_norm[i] > 0 else 0.0
            if grad_norm is not None:
                out[f"grad_norm/{name}"] = grad_norm[i]
        if self.histograms:
            for name, p in zip(self.names, self.params):
                if p.numel():  # DeepSpeed ZeRO-3 leaves partitioned parameters empty
                    self.metrics.histogram(self.step, f"detail/param/{name}", _sample(p))
        return out

    def _activations(self) -> dict:
        names = list(self.acts)
        if not names:
            return {}
        sums = self.env.all_reduce(torch.stack([self.acts[n][0] for n in names]))
        peaks = self.env.all_reduce(torch.stack([self.acts[n][1] for n in names]), "max")
        out = {}
        for name, (total, squares, count), peak in zip(names, sums.tolist(), peaks.tolist()):
            mean = total / count
            key = name if name == "logits" else f"act/{name}"
            out[f"{key}/mean"] = mean
            out[f"{key}/std"] = math.sqrt(max(squares / count - mean * mean, 0.0))
            out[f"{key}/max"] = peak
            if self.acts[name][2] is not None:
                self.metrics.histogram(self.step, f"detail/{key}", self.acts[name][2])
        return out

    def _warnings(self, record: dict) -> list[str]:
        """One line per kind of trouble, naming the worst tensors or blocks first."""
        matrices = [n for n, p in zip(self.names, self.params) if p.ndim >= 2]
        grads = {n: record[f"grad_norm/{n}"] for n in matrices if f"grad_norm/{n}" in record}
        finite = sorted(g for g in grads.values() if math.isfinite(g))
        median = finite[len(finite) // 2] if finite else 0.0
        exploding = {n: g for n, g in grads.items() if not math.isfinite(g) or (median > 0 and g > EXPLODING * median)}
        vanishing = {n: g for n, g in grads.items() if n not in exploding and (g == 0 or g < VANISHING * median)}
        fast = {n: record[f"update_ratio/{n}"] for n in matrices if record[f"update_ratio/{n}"] > UPDATE_RATIO_MAX}
        stds = [(k[len("act/"):-len("/std")], v) for k, v in record.items()
                if k.startswith("act/blocks.") and k.endswith("/std")]
        jumps = {b: s for (_, p), (b, s) in zip(stds, stds[1:])
                 if not math.isfinite(s) or s > ACTIVATION_JUMP * p or s < p / ACTIVATION_JUMP}
        out = []
        for what, values, reverse, unit in ((f"exploding gradients (norm > {EXPLODING:g} x the median weight's "
                                       f"{median:.3g})", exploding, True, "tensors"),
                                      (f"vanishing gradients (norm < {VANISHING:g} x the median weight's "
                                       f"{median:.3g})", vanishing, False, "tensors"),
                                      (f"update/param ratio above {UPDATE_RATIO_MAX:g} (LR too high?)", fast, True,
                                       "tensors"),
                                      (f"activation std changed more than {ACTIVATION_JUMP:g}x from the block "
                                       "before (exploding or vanishing activations)", jumps, True, "blocks")):
            if values:
                worst = sorted(values.items(), key=lambda kv: kv[1] if math.isfinite(kv[1]) else math.inf,
                               reverse=reverse)
                shown = ", ".join(f"{n} {v:.3g}" for n, v in worst[:3])
                more = f" and {len(worst) - 3} more" if len(worst) > 3 else ""
                out.append(f"{what}: {len(worst)} {unit}, worst {shown}{more}")
        return out
