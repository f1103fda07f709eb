"""``bigtrain plan CONFIG [--gpus N] [--gpu NAME] [--mfu F] [--json]``: before a run, what it
needs per GPU, how fast it goes and how long it takes, and a layout that fits.

Nothing is built or allocated: everything is arithmetic on the config, written out here
so a user can check it.

**State per rank** (bytes per parameter ``P``, data-parallel degree ``dp``), at its peak:
after backward, gradients held. ``c`` is the bytes of the compute dtype (2 for bf16, 4 for
fp32); bf16 runs keep fp32 master weights (FSDP2: sharded fp32 parameters, bf16 gathered
for compute; DeepSpeed: a bf16 copy beside the fp32 master partition):

    backend            params           grads      AdamW moments
    none               4P               4P         8P
    fsdp               4P/dp            4P/dp      8P/dp
    zero-1, zero-2     cP + 4P/dp       cP/dp      8P/dp
    zero-3             (c + 4)P/dp      cP/dp      8P/dp

(ZeRO-1 partitions gradients as ZeRO-2 does in DeepSpeed's bf16 optimizer.) ZeRO adds its
gradient and gather buckets (``d_model**2`` elements each, bigtrain/parallel/deepspeed.py);
FSDP holds the gathered compute copy of two blocks (the one computing and the one
prefetched) while a step runs. ``bench/memory.py`` checks the table against the bytes of
every tensor alive on a CPU rank after a real backward, for three sizes.

**Activations per micro-batch**, bytes per token per block, for bigtrain's block under bf16
autocast with fused attention (no ``T x T`` matrix kept; flash/efficient kernels on GPUs):
the residual stream enters each norm in fp32 (4d each, two norms); the bf16 inputs of the
qkv, output and MLP projections (2d each); q, k, v and the attention output (2 bytes each);
the MLP's hidden activations (GELU: its input and output, 2 x 2f; SwiGLU: gate, up, silu
and product, 4 x 2f); dropout masks (1 byte per element) when dropout is on. The LM head
keeps fp32 log-probabilities (4V per token) and needs about twice that again at its peak in
backward. Activation checkpointing (bigtrain/parallel/recompute.py) changes what a block
keeps: ``full`` only its fp32 input (4d) plus one block's worth while it is recomputed;
``op`` also the outputs of the matmuls and attention.

**Time**: tokens/s = MFU x peak x GPUs / FLOPs per token (``GPT.flops_per_token``, the
MFU formula), at the stated MFU (default 0.40, a well-tuned dense run); the peak is the
datasheet's (bigtrain/peak.py). Days = max_steps x tokens per step / tokens/s.

**Suggestion**: the least recompute (none, then op, then full) at the largest micro-batch
(dividing the global batch per rank, at least 4 where possible) whose total fits in 90% of
the GPU's memory. Tensor
parallelism is not in bigtrain yet, so every layout here has tp = 1; a model whose state
alone does not fit on ``--gpus`` GPUs is said to need more GPUs.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from bigtrain.config import Config, ConfigError
from bigtrain.model.gpt import GPT
from bigtrain.peak import gpu_peak

GiB = 2**30
# Memory per GPU (GiB) by device name, first match wins (more specific names first).
GPU_MEMORY_GIB = [(("H200", "NVL"), 141), (("H200",), 141), (("H100", "NVL"), 94), (("H100",), 80),
                  (("A100", "40GB"), 40), (("A100",), 80), (("L40S",), 48), (("L4",), 24), (("A10G",), 24),
                  (("V100", "16GB"), 16), (("V100",), 32)]
POLICIES = ("none", "op", "full")
HEADROOM = 0.9  # the allocator's fragmentation, CUDA context, NCCL buffers
MIN_MICRO = 4   # the smallest micro-batch the suggestion prefers to recomputing activations


def gpu_memory_gib(name: str) -> float:
    upper = name.upper()
    for needles, gib in GPU_MEMORY_GIB:
        if all(n.upper() in upper for n in needles):
            return gib
    raise ConfigError(f"plan: unknown GPU {name!r}; expected one of H200, H100 [PCIe|NVL], A100 [40GB], "
                      "L40S, L4, A10G, V100 [16GB]")


def param_counts(cfg: Config) -> dict:
    """Parameters of the whole model and of its largest block, from the config alone."""
    m = cfg.model
    d, f, V = m.d_model, m.ffn_dim, m.vocab_size
    bias = int(m.bias)
    attn = 4 * d * d + bias * 4 * d + (2 * m.head_dim if m.qk_norm else 0)
    mlp = (3 if m.mlp == "swiglu" else 2) * d * f + bias * ((2 if m.mlp == "swiglu" else 1) * f + d)
    norms = 2 * d * (1 + (bias if m.norm == "layernorm" else 0))
    block = attn + mlp + norms
    embed = V * d + (m.seq_len * d if m.pos == "learned" else 0)
    head = 0 if m.tie_embeddings else V * d
    total = m.n_layer * block + embed + head + d * (1 + (bias if m.norm == "layernorm" else 0))
    return {"total": total, "block": block}


def state_bytes(cfg: Config, dp: int) -> dict:
    """Bytes per rank of parameters, gradients, optimizer state and buffers (the table above)."""
    counts = param_counts(cfg)
    P, block = counts["total"], counts["block"]
    p = cfg.parallel
    c = 2 if p.precision == "bf16" else 4
    if p.backend == "none":
        return {"params": 4 * P, "grads": 4 * P, "optimizer": 8 * P, "buffers": 0}
    if p.backend == "fsdp":
        return {"params": 4 * P / dp, "grads": 4 * P / dp, "optimizer": 8 * P / dp, "buffers": 2 * c * block}
    params = (c + 4) * P / dp if p.zero_stage == 3 else c * P + 4 * P / dp
    buckets = 2 * c * cfg.model.d_model ** 2
    return {"params": params, "grads": c * P / dp, "optimizer": 8 * P / dp, "buffers": buckets}


def activation_bytes(cfg: Config, micro: int, policy: str) -> float:
    """Peak activation bytes of one micro-batch on one rank under checkpointing ``policy``."""
    m, k = cfg.model, cfg.parallel.checkpoint_every
    d, f, V, tokens = m.d_model, m.ffn_dim, m.vocab_size, micro * m.seq_len
    a = 2 if cfg.parallel.precision == "bf16" else 4
    hidden = (4 if m.mlp == "swiglu" else 2) * a * f
    drop = 2 * d if m.dropout > 0 else 0
    qk_norm = 2 * a * d if m.qk_norm else 0
    block = 2 * 4 * d + 3 * a * d + 4 * a * d + hidden + drop + qk_norm  # norms, proj inputs, qkv+out, mlp
    kept_by_op = 4 * d + 3 * a * d + a * d + a * d + (2 if m.mlp == "swiglu" else 1) * a * f  # input + matmul/attn outputs
    if policy == "none":
        per_layer = [block] * m.n_layer
    else:
        kept = 4 * d if policy == "full" else kept_by_op
        per_layer = [kept if i % k == 0 else block for i in range(m.n_layer)]
        per_layer[0] += block  # one block's worth while it is recomputed in backward
    head = 4 * V + 8 * V  # fp32 log-probabilities kept, and about twice that at the backward peak
    return tokens * (sum(per_layer) + 4 * d + head)


@dataclass
class Estimate:
    gpus: int
    gpu: str
    backend: str
    micro_size: int
    activation_checkpointing: str
    params: int
    state_gib: dict
    activations_gib: float
    total_gib: float
    gpu_gib: float
    fits: bool
    tokens_per_s: float
    days: float
    mfu: float
    peak: str


def estimate(cfg: Config, gpus: int, gpu: str, mfu: float, micro: int | None = None,
             policy: str | None = None) -> Estimate:
    micro = micro or cfg.batch.micro_size
    policy = policy or cfg.parallel.activation_checkpointing
    dp = gpus
    state = state_bytes(cfg, dp)
    act = activation_bytes(cfg, micro, policy)
    total = sum(state.values()) + act
    peak = gpu_peak(gpu, cfg.parallel.precision)
    with torch.device("meta"):  # flops_per_token of a model that allocates nothing
        flops = GPT(cfg.model).flops_per_token()
    tokens_per_s = mfu * peak.flops * gpus / flops
    tokens_per_step = cfg.batch.global_size * cfg.model.seq_len
    days = cfg.schedule.max_steps * tokens_per_step / tokens_per_s / 86400
    capacity = gpu_memory_gib(gpu)
    return Estimate(gpus, gpu, cfg.parallel.backend + (f"-zero{cfg.parallel.zero_stage}"
                    if cfg.parallel.backend == "deepspeed" else ""), micro, policy,
                    param_counts(cfg)["total"], {k: round(v / GiB, 4) for k, v in state.items()},
                    round(act / GiB, 3), round(total / GiB, 3), capacity, total <= HEADROOM * capacity * GiB,
                    round(tokens_per_s), round(days, 2), mfu, peak.source)


def suggest(cfg: Config, gpus: int, gpu: str, mfu: float) -> Estimate | None:
    """The least recompute that fits with a micro-batch of at least :data:`MIN_MICRO` (smaller
    ones leave a GPU's matmuls short), at the largest such micro-batch; failing that, the
    largest micro-batch that fits at all. None if nothing does."""
    per_rank = cfg.batch.global_size // gpus if cfg.batch.global_size % gpus == 0 else 0
    micros = [b for b in (2 ** i for i in range(12, -1, -1)) if per_rank and per_rank % b == 0]
    preferred = [b for b in micros if b >= min(MIN_MICRO, per_rank)]
    for candidates in (preferred, micros):
        for policy in POLICIES:
            for micro in candidates:
                est = estimate(cfg, gpus, gpu, mfu, micro, policy)
                if est.fits:
                    return est
    return None


def render(current: Estimate, best: Estimate | None) -> str:
    s = current
    lines = [f"bigtrain plan: {s.params / 1e9:.2f}B parameters on {s.gpus} x {s.gpu} ({s.gpu_gib} GiB), "
             f"backend {s.backend}, tp 1",
             "  per rank: " + " + ".join(f"{k} {v:.2f}" for k, v in s.state_gib.items()) + " GiB",
             f"  activations (micro_size {s.micro_size}, checkpointing {s.activation_checkpointing}): "
             f"{s.activations_gib:.2f} GiB -> total {s.total_gib:.2f} GiB: "
             + ("fits" if s.fits else f"does NOT fit in {HEADROOM:.0%} of {s.gpu_gib} GiB"),
             f"  at MFU {s.mfu:.0%}: {s.tokens_per_s:,.0f} tokens/s, {s.days} days to schedule.max_steps "
             f"(peak: {s.peak})"]
    if best is None:
        lines.append("  suggestion: no micro-batch fits even with full checkpointing; use more GPUs")
    elif (best.micro_size, best.activation_checkpointing) != (s.micro_size, s.activation_checkpointing):
        lines.append(f"  suggestion: batch.micro_size={best.micro_size} "
                     f"parallel.activation_checkpointing={best.activation_checkpointing} ({best.total_gib:.2f} GiB)")
    else:
        lines.append("  suggestion: keep this layout")
    return "\n".join(lines)


def plan(cfg: Config, gpus: int, gpu: str, mfu: float) -> dict:
    if gpus < 1:
        raise ConfigError(f"plan: --gpus {gpus} must be at least 1")
    if not 0 < mfu <= 1:
        raise ConfigError(f"plan: --mfu {mfu} must be in (0, 1]")
    if not isinstance(cfg.model.vocab_size, int):
        raise ConfigError("plan: model.vocab_size is auto and no prepared data is here; set model.vocab_size")
    current, best = estimate(cfg, gpus, gpu, mfu), suggest(cfg, gpus, gpu, mfu)
    return {"current": asdict(current), "suggestion": asdict(best) if best else None,
            "text": render(current, best)}
