"""The sections of the config schema: one small pydantic model per part of a run.

Every section forbids unknown keys (a typo is an error naming the key and the nearest valid
one) and refuses NaN or infinity in any float. The top-level :class:`~bigtrain.config.Config`,
the cross-section checks and the loading live in :mod:`bigtrain.config`, which re-exports
these names; the README's config table is generated from the field descriptions here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

class Section(BaseModel):
    # allow_inf_nan=False: no setting means anything at NaN or infinity, and an inf LR would
    # turn the first update into NaN parameters several steps into a run instead of failing now.
    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True, allow_inf_nan=False)


# Presets are defaults for the model section; keys written in the YAML win.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "gpt2-124m": dict(n_layer=12, n_head=12, d_model=768, seq_len=1024, vocab_size=50257,
                      norm="layernorm", mlp="gelu", pos="learned", bias=True, tie_embeddings=True),
    "gpt2-350m": dict(n_layer=24, n_head=16, d_model=1024, seq_len=1024, vocab_size=50257,
                      norm="layernorm", mlp="gelu", pos="learned", bias=True, tie_embeddings=True),
    "llama-1b": dict(n_layer=22, n_head=32, d_model=2048, d_ff=5632, seq_len=2048, vocab_size=32000,
                     norm="rmsnorm", mlp="swiglu", pos="rope", bias=False, tie_embeddings=False),
}


class ModelConfig(Section):
    """The transformer. ``vocab_size: auto`` is read from the prepared data's manifest."""
    preset: Optional[str] = Field(None, description="gpt2-124m | gpt2-350m | llama-1b: defaults for this section; keys you set win")
    n_layer: int = Field(4, ge=1, description="transformer blocks")
    n_head: int = Field(4, ge=1, description="attention heads; must divide d_model")
    n_kv_head: Optional[int] = Field(None, ge=1, description="key/value heads (grouped-query attention); "
                                                           "must divide n_head; default n_head")
    d_model: int = Field(128, ge=1, description="residual stream width")
    d_ff: Optional[int] = Field(None, ge=1, description="MLP width; default 4*d_model (gelu) or ~8/3*d_model (swiglu)")
    seq_len: int = Field(128, ge=1, description="context length; samples are seq_len+1 tokens")
    vocab_size: Union[int, Literal["auto"]] = Field("auto", description="auto: from the prepared data manifest")
    norm: Literal["layernorm", "rmsnorm"] = Field("layernorm", description="layernorm | rmsnorm")
    norm_eps: float = Field(1e-5, gt=0, description="epsilon of every norm")
    mlp: Literal["gelu", "swiglu"] = Field("gelu", description="gelu (tanh approximation, as GPT-2) | swiglu")
    pos: Literal["learned", "rope"] = Field("learned", description="learned absolute positions | rope")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base")
    bias: bool = Field(True, description="biases in linear layers and LayerNorm")
    tie_embeddings: bool = Field(True, description="LM head shares the token embedding")
    qk_norm: bool = Field(False, description="RMSNorm on queries and keys per head")
    dropout: float = Field(0.0, ge=0, lt=1, description="embedding, attention and residual dropout")
    z_loss: float = Field(0.0, ge=0, description="weight of the z-loss (log Z)^2 on the logits; 1e-4 is common")
    init_std: float = Field(0.02, gt=0, description="std of N(0, std) init; residual projections get std/sqrt(2*n_layer)")
    init_from: Optional[str] = Field(None, description="a local Hugging Face GPT2LMHeadModel or LlamaForCausalLM "
                                                     "directory (config.json + safetensors) to start from; its config "
                                                     "decides the architecture keys")
    # Document masking (bigtrain/model/doc_mask.py).
    doc_mask: bool = Field(False, description="attention stays inside each document of a packed window and "
                                              "positions restart after every eot_id token")
    eot_id: Union[Annotated[int, Field(ge=0)], Literal["auto"]] = Field(
        "auto", description="the token that ends a document (doc_mask); auto: from the prepared data manifest")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, values: Any) -> Any:
        if isinstance(values, dict) and values.get("preset") is not None:
            name = values["preset"]
            if name not in MODEL_PRESETS:
                raise ValueError(f"unknown preset {name!r}; expected one of {sorted(MODEL_PRESETS)}")
            values = {**MODEL_PRESETS[name], **values}
        return values

    @model_validator(mode="after")
    def _check_shapes(self) -> "ModelConfig":
        if self.d_model % self.n_head:
            raise ValueError(f"n_head={self.n_head} does not divide d_model={self.d_model}")
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_kv_head={self.n_kv_head} does not divide n_head={self.n_head}")
        if self.pos == "rope" and (self.d_model // self.n_head) % 2:
            raise ValueError("rope needs an even head dimension (d_model / n_head)")
        if isinstance(self.vocab_size, int) and self.vocab_size < 2:
            raise ValueError("vocab_size must be at least 2")
        return self

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def kv_heads(self) -> int:
        """Key/value heads: ``n_kv_head``, or ``n_head`` (plain multi-head attention)."""
        return self.n_kv_head or self.n_head

    @property
    def kv_dim(self) -> int:
        """Output width of the key and of the value projection."""
        return self.kv_heads * self.head_dim

    @property
    def ffn_dim(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.mlp == "swiglu":  # LLaMA: 2/3 of 4d, rounded up to a multiple of 64
            return 64 * ((int(8 * self.d_model / 3) + 63) // 64)
        return 4 * self.d_model


class SourceConfig(Section):
    """One source of a weighted mixture (``data.sources``)."""
    path: str = Field(..., min_length=1, description="a directory written by `bigtrain prepare`")
    weight: float = Field(1.0, ge=0, description="its share of the samples, relative to the other sources' "
                                                 "weights; 0 reads none (a source kept for the run's history)")
    name: Optional[str] = Field(None, pattern=r"^[A-Za-z0-9_.-]+$",
                                description="label in metrics (loss/NAME, eval/val_loss/NAME) and inspect; "
                                            "default: the directory's name")

    @model_validator(mode="after")
    def _default_name(self) -> "SourceConfig":
        if self.name is None:  # object.__setattr__: an assignment would validate (and call this) again
            object.__setattr__(self, "name", Path(self.path.rstrip("/")).name or "source")
        return self


class DataConfig(Section):
    """A directory written by ``bigtrain prepare``, or a weighted mixture of several (``sources``)."""
    path: str = Field("data/stdlib", description="a directory written by `bigtrain prepare`; with data.sources "
                                                 "it is set to the first source's path (tokenizer, vocab_size)")
    sources: Optional[list[SourceConfig]] = Field(None, min_length=1,
                                                  description="a weighted mixture instead of one path: "
                                                              "[{path, weight, name}, ...]; the sources must share "
                                                              "the tokenizer; sources may be added at the end and "
                                                              "weights changed when resuming (README: Data mixtures)")
    val_path: Optional[str] = Field(None, description="another prepared dir to evaluate on")
    val_fraction: float = Field(0.005, ge=0, lt=1,
                                description="when the data has no val split (e.g. one document), hold out "
                                            "this tail fraction of train tokens for eval")
    prefetch: int = Field(2, ge=0, description="global batches prepared ahead in a background thread")

    @model_validator(mode="before")
    @classmethod
    def _path_of_sources(cls, values: Any) -> Any:
        sources = values.get("sources") if isinstance(values, dict) else None
        if isinstance(sources, list) and sources:
            first = sources[0]
            path = first.get("path") if isinstance(first, dict) else getattr(first, "path", None)
            if path is not None:
                values = {**values, "path": path}
        return values

    @model_validator(mode="after")
    def _check_sources(self) -> "DataConfig":
        if self.sources:
            if not any(s.weight > 0 for s in self.sources):
                raise ValueError("every weight in data.sources is 0; at least one must be positive")
            names = [s.name for s in self.sources]
            if len(set(names)) < len(names):
                twice = next(n for n in names if names.count(n) > 1)
                raise ValueError(f"two of data.sources are named {twice!r}; give each a distinct name")
        return self


class RampupConfig(Section):
    """Megatron-style batch ramp-up keyed on samples consumed (so it survives resume)."""
    start: int = Field(..., ge=1, description="global batch size at sample 0")
    increment: int = Field(..., ge=1, description="the batch grows by this many samples at a time")
    samples: int = Field(..., ge=1, description="samples consumed over which it reaches batch.global_size")


class BatchConfig(Section):
    global_size: int = Field(32, ge=1, description="samples per optimizer step, over all ranks")
    micro_size: int = Field(8, ge=1, description="samples per forward pass on one rank")
    reference_size: Optional[int] = Field(None, ge=1,
                                          description="the batch optim.lr was tuned at; default global_size")
    rampup: Optional[RampupConfig] = Field(None, description="{start, increment, samples}: grow the batch with samples consumed")

    @model_validator(mode="after")
    def _check(self) -> "BatchConfig":
        if self.global_size % self.micro_size:
            raise ValueError(f"global_size={self.global_size} is not a multiple of micro_size={self.micro_size}")
        if self.rampup is not None:
            r = self.rampup
            if r.start > self.global_size:
                raise ValueError(f"rampup.start={r.start} exceeds global_size={self.global_size}")
            if r.start % self.micro_size or r.increment % self.micro_size:
                raise ValueError(f"rampup.start and rampup.increment must be multiples of micro_size={self.micro_size}")
            if (self.global_size - r.start) % r.increment:  # else the ramp never lands on global_size
                raise ValueError(f"rampup.increment={r.increment} does not divide global_size - rampup.start = "
                                 f"{self.global_size} - {r.start}")
        return self


Beta = Annotated[float, Field(ge=0, lt=1)]  # torch's AdamW raises on others, but only once the run has started


class OptimConfig(Section):
    lr: float = Field(3e-4, gt=0, description="peak LR at batch.reference_size")
    betas: tuple[Beta, Beta] = Field((0.9, 0.95), description="AdamW betas")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon")
    weight_decay: float = Field(0.1, ge=0, description="decoupled weight decay on matrices (not biases, norms, embeddings)")
    decay_embeddings: bool = Field(False, description="apply weight decay to embeddings too")
    grad_clip: float = Field(1.0, ge=0, description="max global grad norm; 0 disables clipping")


class ScheduleConfig(Section):
    scaling: Literal["linear", "sqrt", "none"] = Field("none", description="LR scaling from batch.reference_size to the actual batch: linear | sqrt | none")
    warmup_steps: int = Field(0, ge=0, description="linear warmup from 0 to the peak LR")
    decay: Literal["cosine", "linear", "constant", "wsd"] = Field(
        "cosine", description="cosine | linear | constant, from warmup_steps to max_steps; wsd: warmup-stable-"
                              "decay, the peak LR until decay_start, then decay_shape down to min_lr")
    min_lr: float = Field(0.0, ge=0, description="LR at the end of decay, at batch.reference_size")
    max_steps: int = Field(100, ge=1, description="optimizer steps in the run")
    decay_steps: Optional[int] = Field(None, ge=1, description="wsd: length of the decay phase in updates")
    decay_fraction: Optional[float] = Field(None, gt=0, le=1, description="wsd: length of the decay phase as a "
                                                                          "fraction of max_steps")
    decay_start: Optional[int] = Field(None, ge=0, description="wsd: the update at which the decay starts; "
                                                               "default max_steps minus its length "
                                                               "(`bigtrain anneal` sets the resumed update count)")
    decay_shape: Literal["linear", "cosine", "1-sqrt"] = Field("1-sqrt", description="wsd: shape of the decay "
                                                               "from the peak to min_lr: linear | cosine | "
                                                               "1-sqrt (1 - sqrt(progress), Hägele et al. 2024)")

    @model_validator(mode="after")
    def _check_wsd(self) -> "ScheduleConfig":
        if self.decay != "wsd":
            return self
        if (self.decay_steps is None) == (self.decay_fraction is None):
            raise ValueError("decay=wsd needs exactly one of decay_steps and decay_fraction")
        start, length = self.decay_start, self.decay_length()
        if start is None and length > self.max_steps - self.warmup_steps:
            raise ValueError(f"the wsd decay ({length} updates) does not fit after warmup_steps="
                             f"{self.warmup_steps} in max_steps={self.max_steps}")
        if start is not None and start < self.warmup_steps:
            raise ValueError(f"decay_start={start} is inside the warmup (warmup_steps={self.warmup_steps})")
        if start is not None and start + length > self.max_steps:
            raise ValueError(f"decay_start={start} + the decay ({length} updates) ends after "
                             f"max_steps={self.max_steps}")
        return self

    def decay_length(self) -> int:
        """wsd: updates in the decay phase (a fraction counts against max_steps)."""
        if self.decay_steps is not None:
            return self.decay_steps
        return max(1, round(self.decay_fraction * self.max_steps))

    def stable_until(self) -> int:
        """wsd: the update at which the decay starts."""
        return self.max_steps - self.decay_length() if self.decay_start is None else self.decay_start


class EMAConfig(Section):
    """An exponential moving average of the weights, used for evaluation and ``export --ema``;
    the update and its warm-up: bigtrain/ema.py."""
    decay: float = Field(0.0, ge=0, lt=1, description="EMA decay per optimizer update (0.999-0.9999 is "
                                                       "common); 0: off")
    warmup: bool = Field(False, description="warm the decay up: min(decay, (1+n)/(10+n)) at update n, "
                                            "so early weights fade fast")
    every: int = Field(1, ge=1, description="update the EMA every N steps, with decay**N (the same time "
                                            "constant in steps)")


# Where ``auto`` compiles on the CPU. bench/compile.py on this 2-core CPU: compiled blocks take
# 0.95x the eager step at 25M parameters and 0.97x at 124M for 17-18 s of compile (repaid after
# ~290 and ~470 steps), 0.93x at 0.8M for 29 s (after ~6700 steps); smoke runs, tests and
# short checks would only wait for it. With freed host memory kept (keep_host_memory): 0.90x at
# 25M, 1.00-1.02x at 124M (compile no longer pays there; not yet changed on two noisy runs).
CPU_COMPILE_MIN_PARAMS, CPU_COMPILE_MIN_STEPS = 10_000_000, 1000


class ParallelConfig(Section):
    backend: Literal["none", "fsdp", "deepspeed"] = Field("none", description="none (one replica per process) | fsdp (FSDP2) | deepspeed (ZeRO)")
    zero_stage: int = Field(2, ge=1, le=3, description="DeepSpeed ZeRO: 1 shards optimizer state, 2 also "
                                                       "gradients, 3 also parameters")
    precision: Literal["bf16", "fp32"] = Field("bf16", description="bf16: autocast / bf16 params with fp32 master weights; fp32")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available")
    activation_checkpointing: Literal["none", "full", "op"] = Field(
        "none", description="none | full (recompute whole blocks in backward) | op (keep matmul and attention "
                            "outputs, recompute the cheap ops); true/false mean full/none")
    checkpoint_every: int = Field(1, ge=1, description="apply activation checkpointing to every k-th block only")
    compile: bool | Literal["auto"] = Field(
        "auto", description="torch.compile each block: auto (on CUDA; on CPU for runs of at least 1000 steps of a "
                            "model of at least 10M non-embedding parameters, where bench/compile.py measured the "
                            "17-29 s compile repaid within 500 steps) | true | false")
    reshard_after_forward: bool = Field(True, description="FSDP: free gathered params after forward (less memory, more traffic)")
    deterministic: bool = Field(False, description="torch.use_deterministic_algorithms(True)")
    keep_host_memory: bool | Literal["auto"] = Field(
        "auto", description="keep freed host memory for reuse instead of returning it to the kernel every step "
                            "(glibc malloc, bigtrain/host_memory.py): auto (on CPU runs, where it saves the "
                            "step's page faults) | true | false")
    tp: int = Field(1, ge=1, description="tensor-parallel degree (backend fsdp): attention heads, MLP and vocabulary "
                                         "split over tp ranks, FSDP over the world / tp data-parallel ranks")
    vocab_table: Literal["auto", "gather", "sharded"] = Field(
        "auto", description="backend fsdp, tp 1: gather (FSDP gathers the token table around its use) | sharded "
                            "(the lookup and the head computed on the table's shards, bigtrain/parallel/vocab_parallel.py) "
                            "| auto: sharded where its exchange holds less than the table (small micro-batches)")
    loss_parallel: bool = Field(False, description="with tp > 1: the cross-entropy on vocabulary-sharded logits "
                                                   "(the full logits are never gathered); needs tp to divide the vocabulary")

    @field_validator("activation_checkpointing", mode="before")
    @classmethod
    def _checkpointing_bool(cls, v: Any) -> Any:
        return {True: "full", False: "none"}.get(v, v) if isinstance(v, bool) else v  # the key was a bool

    def compiles(self, device: str, steps: int, params: int) -> bool:
        """Whether blocks are compiled on ``device`` ("cpu" | "cuda") for a run of ``steps`` steps
        of a model with ``params`` non-embedding parameters. ``auto``: always on CUDA; on the CPU
        where the compile repays itself (``CPU_COMPILE_MIN_PARAMS``, ``CPU_COMPILE_MIN_STEPS``).
        Decided from the config alone, so a resumed run compiles as the run it continues did."""
        if self.compile != "auto":
            return self.compile
        return device == "cuda" or (params >= CPU_COMPILE_MIN_PARAMS and steps >= CPU_COMPILE_MIN_STEPS)

    def keeps_host_memory(self, device: str) -> bool:
        """Whether freed host memory is kept (bigtrain/host_memory.py): ``auto`` on the CPU only."""
        return device == "cpu" if self.keep_host_memory == "auto" else self.keep_host_memory


class CheckpointConfig(Section):
    every: int = Field(0, ge=0, description="save every N steps; 0: only at the end")
    keep: int = Field(3, ge=1, description="committed checkpoints kept (newest)")
    resume: str = Field("auto", description="auto (the newest committed) | never | <path to a step-XXXXXXXX dir>; "
                                            "a path from another run counts until this run has its own")
    async_save: bool = Field(False, alias="async", description="write checkpoints in the background while training goes on")
    fallback: bool = Field(False, description="if the newest checkpoint is unreadable, try older ones")
    accept_data_change: bool = Field(False, description="resume although the data order changed (seed, corpus, "
                                                         "sample count): the saved position then points into "
                                                         "another stream")


class StabilityConfig(Section):
    """The spike/NaN guard; the rule and how to tune it: bigtrain/stability/detector.py."""
    enabled: bool = Field(True, description="spike/NaN detection and the skip/rollback/abort guard")
    threshold: float = Field(6.0, gt=0, description="a spike: the loss this many spreads above its trend's expectation")
    trend: int = Field(8, ge=2, description="last normal losses the expected loss is extrapolated from (a resistant line)")
    window: int = Field(128, ge=2, description="last one-step errors of that expectation the spread is measured on")
    min_spread: float = Field(0.01, ge=0, description="floor of the spread, as a fraction of the expected loss")
    warmup: int = Field(10, ge=1, description="normal steps seen before spikes are judged (NaN/inf always are)")
    max_consecutive: int = Field(3, ge=1, description="anomalous steps in a row that trigger a rollback")
    max_rollbacks: int = Field(3, ge=0, description="rollbacks in one chain before the run aborts; a chain ends once the replay has made `window` normal steps from where its first episode began")
    rollback_margin: int = Field(0, ge=0, description="extra global batches skipped past the anomaly")
    skip: Literal["culprits", "window"] = Field("culprits", description="after a rollback skip only the samples that stand out under the restored model (culprits; the window when none does) or every sample since the checkpoint (window)")
    trace_anomalies: bool = Field(False, description="on a non-finite step, re-run it to name the first module that produced NaN/inf")


class EvalConfig(Section):
    every: int = Field(0, ge=0, description="evaluate every N steps (and at the end); 0: only at the end")
    batches: int = Field(8, ge=0, description="global batches of the val split per evaluation")


class WandbConfig(Section):
    """Weights & Biases beside TensorBoard (bigtrain/wandb_sink.py; needs `pip install 'bigtrain[wandb]'`)."""
    project: str = Field(..., min_length=1, description="W&B project")
    mode: Literal["online", "offline", "disabled"] = Field("online", description="online | offline (kept under "
                                                           "RUN_DIR/wandb; upload later with `wandb sync`) | disabled")
    entity: Optional[str] = Field(None, description="W&B team or user; default: your own")
    name: Optional[str] = Field(None, description="W&B run name; default: the run dir's name")


class LoggingConfig(Section):
    every: int = Field(10, ge=1, description="log train metrics every N steps")
    detail_every: int = Field(0, ge=0, description="per-layer norms, update ratios, activations every N steps; 0: off")
    tensorboard: bool = Field(True, description="write TensorBoard events to RUN_DIR/tb")
    progress: Literal["auto", "bar", "plain", "off"] = Field("auto", description="auto: a bar on a terminal, plain lines otherwise")
    wandb: Optional[WandbConfig] = Field(None, description="{project, mode}: also send the metrics and ledger "
                                                            "events to Weights & Biases")

    @field_validator("progress", mode="before")
    @classmethod
    def _yaml_off(cls, v: Any) -> Any:
        return {False: "off", True: "auto"}.get(v, v) if isinstance(v, bool) else v  # YAML reads `off` as false


class ProfileConfig(Section):
    """A torch profiler trace of a few steps on every rank (bigtrain/profiling.py); off by default."""
    steps: Optional[tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]]] = Field(
        None, description="[a, b]: trace steps a..b (inclusive) into RUN_DIR/profile/ (Chrome trace per rank; "
                          "on CUDA also a memory snapshot)")

    @field_validator("steps")
    @classmethod
    def _ordered(cls, v: Any) -> Any:
        if v is not None and v[0] > v[1]:
            raise ValueError(f"the first step {v[0]} is after the last {v[1]}")
        return v


class FaultsConfig(Section):
    """Deliberate faults for tests and demos; all off by default."""
    spike_at: list[int] = Field([], description="steps whose batches are corrupted so the loss spikes")
    nan_at: list[int] = Field([], description="steps whose gradient gets a NaN on faults.rank")
    crash_at: list[int] = Field([], description="steps at which faults.rank is killed with SIGKILL")
    crash_in_checkpoint_at: Optional[int] = Field(None, description="kill -9 in the middle of writing this step's checkpoint")
    rank: int = Field(0, ge=0, description="the rank that the NaN and crash faults hit")
