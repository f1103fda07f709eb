"""``parallel.backend: deepspeed``: ZeRO stage 1, 2 or 3 through a DeepSpeed engine.

The DeepSpeed config is generated from ours by :func:`deepspeed_config` (micro
batch, accumulation, bf16, clipping, AdamW with our hyperparameters); nobody
writes DeepSpeed JSON by hand, so the two can never disagree. The optimizer is
built by DeepSpeed from that config over :func:`bigtrain.optim.param_groups`,
and the learning rate is ours: the trainer's ``lr_at(updates, batch)`` is written
into the param groups before every update (:meth:`Backend.update`).

DeepSpeed's engine has its own idea of a training step (``backward`` scales the
loss by 1/accumulation steps, ``step`` counts micro-batches and updates on the
boundary). Ours is different, and the mapping is:

* accumulation boundary: we set it ourselves before each micro-batch
  (``set_gradient_accumulation_boundary(last)``), so a ramped-up batch with any
  number of micro-batches works, and gradients are reduced exactly once, after
  the last one;
* loss scale: our loss is already the micro-batch's share of the rank's token
  mean, so ``backward(..., scale_wrt_gas=False)``; ZeRO then averages over ranks,
  which makes it the token mean of the global batch (ranks hold equal tokens);
* gradient norm: the one DeepSpeed's optimizer computes from the reduced
  gradient partitions (the value it will clip with), identical on every rank;
  non-finite when any rank has a NaN or inf;
* clipping: DeepSpeed's own, inside its step, at ``optim.grad_clip`` (written into
  its config; :meth:`DeepSpeedBackend.update` refuses any other ``max_norm``);
* a skipped step (:meth:`~bigtrain.parallel.backend.Backend.discard`): DeepSpeed
  keeps reduced gradients in private buffers that only its ``step`` releases, so we
  run that step with the wrapped AdamW's update suppressed. DeepSpeed clears its
  buffers by its own code; parameters, Adam moments and the Adam step count are
  untouched.

Initialisation: a model on ``meta`` (as the trainer builds it) is, at ZeRO-1/2, made
whole on the device from :func:`~bigtrain.model.init.initial_weights` (these stages keep
whole parameters on every rank); at ZeRO-3 it is rebuilt under DeepSpeed's
``zero.Init``, which partitions each module as soon as it is built (at most one
module whole on a rank), and each parameter is then written through
``GatheredParameters`` (DeepSpeed's documented way to change a ZeRO-3 parameter), one
at a time. Either way the weights are bitwise those of the single-process run in fp32;
with bf16 DeepSpeed keeps bf16 weights and derives its fp32 master copy from them (as
it did when handed a whole fp32 model).

Capabilities: its checkpoints are DeepSpeed's own files, loadable only at the
same world size; gradients live in ZeRO's partition buffers, not in ``.grad``; no
async save.
"""
from __future__ import annotations

import contextlib
import math
import os
import warnings
from pathlib import Path

import torch

from bigtrain.config import Config, ConfigError
from bigtrain.ema import load_partitions, save_partitions
from bigtrain.model.gpt import GPT
from bigtrain.model.init import initial_weights, is_meta, materialize, on_device
from bigtrain.optim import param_groups, set_lr
from bigtrain.parallel.base import Backend, prepare_blocks
from bigtrain.parallel.env import DistEnv
from bigtrain.plan import param_counts

# DeepSpeed calls collectives that torch deprecates; the warning would repeat every step.
warnings.filterwarnings("ignore", category=FutureWarning, message=r"`torch\.distributed\.\w+` is deprecated")


def deepspeed_config(cfg: Config, world: int) -> dict:
    """The DeepSpeed config dict for ``cfg`` on ``world`` ranks (at the full global batch)."""
    p, o, b = cfg.parallel, cfg.optim, cfg.batch
    if b.global_size % (b.micro_size * world):
        raise ConfigError(f"config error: batch.global_size={b.global_size} is not a multiple of "
                          f"batch.micro_size={b.micro_size} x world size {world}")
    # Buckets sized by the model, as Hugging Face's "auto" does: DeepSpeed's fixed default
    # (5e8 elements) allocates gigabytes of bucket per rank whatever the model's size.
    d2 = cfg.model.d_model ** 2
    zero: dict = {"stage": p.zero_stage, "contiguous_gradients": True, "overlap_comm": False,
                  "reduce_bucket_size": d2, "allgather_bucket_size": d2}
    if p.zero_stage == 3:  # gather a block ahead; keep only vectors (norms, biases) replicated
        # and at most two blocks gathered at once, as FSDP does: DeepSpeed's defaults (1e9
        # parameters live, and kept when reused within 1e9) keep every parameter of a smaller
        # model gathered from its forward to its backward, a whole bf16 copy on every rank.
        block = param_counts(cfg)["block"]
        zero |= {"stage3_prefetch_bucket_size": int(0.9 * d2),
                 "stage3_param_persistence_threshold": 10 * cfg.model.d_model,
                 "stage3_max_live_parameters": 2 * block, "stage3_max_reuse_distance": block}
    return {
        "train_batch_size": b.global_size,
        "train_micro_batch_size_per_gpu": b.micro_size,
        "gradient_accumulation_steps": b.global_size // (b.micro_size * world),
        "gradient_clipping": o.grad_clip,
        "bf16": {"enabled": p.precision == "bf16"},
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": {
            "lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay,
            "torch_adam": True, "foreach": True}},
        "steps_per_print": 2**31 - 1,   # we log; DeepSpeed stays quiet
        "wall_clock_breakdown": False,
    }


class DeepSpeedBackend(Backend):
    name = "deepspeed"
    reshards_checkpoints = False
    has_local_grads = False
    async_checkpoint = False
    checkpoint_format = "deepspeed"

    def __init__(self, model: GPT, cfg: Config, env: DistEnv):
        os.environ.setdefault("DS_ACCELERATOR", "cpu" if env.device.type == "cpu" else "cuda")
        import deepspeed

        ds_config = deepspeed_config(cfg, env.world)
        if cfg.parallel.zero_stage == 3 and is_meta(model):
            # Built for real, partitioned module by module; its construction-time init
            # (nn.Linear's own) is overwritten below, so it must not move the dropout RNG.
            # zero.Init reads the world size from DeepSpeed's view of our process group.
            from deepspeed.accelerator import get_accelerator
            deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
            with torch.random.fork_rng(devices=[env.device] if env.device.type == "cuda" else []), \
                    deepspeed.zero.Init(config_dict_or_path=ds_config):
                model = GPT(model.cfg, init=False)
            materialize(model, initial_weights(cfg, model))
        else:
            model = on_device(model, cfg, env.device)
        prepare_blocks(model, cfg, env.device)
        o = cfg.optim
        engine, *_ = deepspeed.initialize(
            model=model, config=ds_config,
            model_parameters=param_groups(model, o.weight_decay, o.decay_embeddings))
        super().__init__(model, cfg, env)
        self.engine = self.model = engine
        self.optimizer = engine.optimizer
        self.stage = cfg.parallel.zero_stage
        self._unconsumed = False  # reduced gradients wait for step() or a skip

    # -- forward / backward ---------------------------------------------------------
    def autocast(self):
        return contextlib.nullcontext()  # the engine holds bf16 (or fp32) weights itself

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(last)  # the engine reads it inside backward
        self.engine.backward(loss, scale_wrt_gas=False)
        self._unconsumed = self._unconsumed or last

    # -- gradients and updates -----------------------------------------------------------
    def grad_norm(self) -> torch.Tensor:
        """DeepSpeed's global norm over the reduced gradient partitions (it all-reduces)."""
        from deepspeed.runtime.utils import combine_grad_norm_groups, is_invalid_grad_norm
        opt = self.engine.optimizer
        norm = opt._get_norm_groups() if self.stage == 3 else [opt.scaled_global_norm()]
        norm = combine_grad_norm_groups(norm).float() / opt.loss_scale
        # DeepSpeed marks a NaN/inf norm as negative; ours is NaN, as for the other backends.
        if is_invalid_grad_norm(norm):
            return torch.full((), math.nan, device=self.env.device)
        return norm.reshape(()).to(self.env.device)

    def _clip_factor(self, norm: torch.Tensor, max_norm: float) -> torch.Tensor:
        """DeepSpeed clips inside its step, with this same norm and ``optim.grad_clip``: only
        the factor is computed here, for the metrics."""
        if max_norm != self.engine.gradient_clipping():
            raise ValueError(f"deepspeed clips at optim.grad_clip={self.engine.gradient_clipping()} "
                             f"inside its step, not at {max_norm}")
        return super()._clip_factor(norm, max_norm)

    def _step(self, lr: float | torch.Tensor, apply: torch.Tensor | None, clip: torch.Tensor | None) -> None:
        """DeepSpeed's step is decided on the host: its engine reads its own overflow and norm
        values there anyway, so the device-side skip would save nothing. It clips by itself
        (``clip`` is its own factor, :meth:`_clip_factor`)."""
        if apply is not None and not bool(apply):
            self._zero_grad()  # its buffers released, nothing updated
            return
        set_lr(self.engine.optimizer, float(lr))
        self.engine.step()
        self._unconsumed = False

    def _zero_grad(self) -> None:
        if self._unconsumed:  # skipped: let DeepSpeed release its gradients, update nothing
            with self._update_suppressed():
                self.engine.step()
            self._unconsumed = False

    @contextlib.contextmanager
    def _update_suppressed(self):
        adamw = self.engine.optimizer.optimizer
        adamw.step = lambda closure=None: None  # shadows the method for this one call
        try:
            yield
        finally:
            del adamw.step

    # -- state -----------------------------------------------------------------------------
    def full_parameters(self) -> dict[str, torch.Tensor]:
        from deepspeed.utils import safe_get_full_fp32_param
        return {n: safe_get_full_fp32_param(p).detach().float().cpu().clone()
                for n, p in self.raw_model.named_parameters()}

    # -- the EMA of the weights: of this rank's fp32 master partitions, never a whole copy ------
    def _masters(self) -> list[torch.Tensor]:
        """This rank's flat fp32 master partitions: ZeRO-1/2 its share of each parameter group
        (``BF16_Optimizer``, ZeRO-1 under bf16, the same), ZeRO-3 its partitions of each sub-group."""
        opt = self.engine.optimizer
        for attr in ("single_partition_of_fp32_groups", "fp32_groups_flat_partition", "fp32_partitioned_groups_flat"):
            if hasattr(opt, attr):
                return list(getattr(opt, attr))
        raise RuntimeError(f"no fp32 master partitions found in {type(opt).__name__}")

    def ema_targets(self) -> dict[str, torch.Tensor]:
        return {f"partition{i}": t for i, t in enumerate(self._masters())}

    def _fragments(self) -> dict[str, tuple[int, int, int, int]]:
        """Parameter name -> (partition, start in it, numel, start in the flattened parameter) of
        what this rank's master partitions hold (see :func:`bigtrain.ema.consolidate`)."""
        opt, out = self.engine.optimizer, {}
        for name, p in self.raw_model.named_parameters():
            if self.stage == 3:  # rank r holds elements [r * size, (r + 1) * size), the last one padded
                part, start, numel = opt.grad_position[opt.get_param_id(p)]
                offset = self.env.rank * p.ds_tensor.ds_numel
                numel = min(numel, p.ds_numel - offset)
            elif (mapping := getattr(p, "_hp_mapping", None)) is not None:
                part, offset = mapping.param_group_index, mapping.lp_fragment_address.start
                start, numel = mapping.hp_fragment_address.start, mapping.hp_fragment_address.numel
            else:
                continue  # none of this parameter lies in this rank's partition
            if numel > 0:
                out[name] = (int(part), int(start), int(numel), int(offset))
        return out

    def ema_refresh(self) -> None:
        """Copy the fp32 masters into the weights the forward uses, as DeepSpeed's step does."""
        opt = self.engine.optimizer
        if self.stage == 3:
            for group in range(len(opt.fp16_partitioned_groups_flat)):
                opt._reassign_or_swap_out_partitioned_parameters(group)
            # free every gathered copy (an eval forward leaves some, and the small persistent
            # ones stay gathered): the next forward gathers the partitions as they are now
            self.engine.empty_partition_cache()
        else:
            opt.update_lp_params()

    def save_sharded(self, path: Path) -> None:
        """Model and optimizer shards into directory ``path`` (DeepSpeed's format), and this rank's
        EMA (``ema-<rank>.pt``, :mod:`bigtrain.ema`); every rank calls it."""
        path = Path(path)
        self.engine.save_checkpoint(str(path.parent), tag=path.name, save_latest=False)
        if self.ema is not None:
            save_partitions(path, self.env.rank, self.ema, self._fragments())

    def load_sharded(self, path: Path) -> None:
        """Load model and optimizer shards written by :meth:`save_sharded` at the same world size."""
        path = Path(path)
        if not path.is_dir():
            raise ConfigError(f"checkpoint {str(path)!r}: no DeepSpeed shards there")
        loaded, _ = self.engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                                load_lr_scheduler_states=False)
        if loaded is None:
            raise ConfigError(f"checkpoint {str(path)!r}: DeepSpeed could not load it")
        if self.ema is not None and not load_partitions(path, self.env.rank, self.ema):
            self.ema.reset()  # written with ema.decay=0: the average starts at the loaded weights
