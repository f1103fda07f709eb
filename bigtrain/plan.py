"""``bigtrain plan CONFIG [--gpus N] [--gpu NAME] [--mfu F] [--json]``: before a run, what it
needs per GPU, how fast it goes and how long it takes, and a layout that fits.

Nothing is built or allocated: everything is arithmetic on the config, written out here
so a user can check it. ``--gpus N`` is the whole run: ``tp`` x ``dp`` GPUs.

**Which parameters tensor parallelism shards** (``parallel.tp``; bigtrain/parallel/tp.py):
the attention and MLP projections (q, k, v, fc / gate and up column-wise, with their biases;
``attn.proj`` and ``mlp.proj`` row-wise) and the vocabulary rows of the token embedding and
the LM head. The norms, QK-norms, learned positions and the row-parallel biases stay whole
on every tp rank. A rank's parameter count is ``P' = S / tp + R`` (sharded, replicated).
Grouped-query attention (``model.n_kv_head``) gives k and v ``kv_dim`` rows each.

**State per rank** (bytes per parameter, ``dp = gpus / tp`` data-parallel ranks), at its
peak: after backward, gradients held. ``c`` is the bytes of the compute dtype (2 for bf16,
4 for fp32); bf16 runs keep fp32 master weights (FSDP2: sharded fp32 parameters, bf16
gathered for compute; DeepSpeed: a bf16 copy beside the fp32 master partition):

    backend            params           grads      AdamW moments
    none               4P               4P         8P
    fsdp               4P'/dp           4P'/dp     8P'/dp
    zero-1, zero-2     cP + 4P/dp       cP/dp      8P/dp
    zero-3             (c + 4)P/dp      cP/dp      8P/dp

(tp > 1 needs FSDP, so ``P' = P`` elsewhere; ZeRO-1 partitions gradients as ZeRO-2 does in
DeepSpeed's bf16 optimizer.) ZeRO adds its gradient and gather buckets (``d_model**2``
elements each, bigtrain/parallel/deepspeed.py); FSDP holds the gathered compute copy of two
blocks (the one computing and the one prefetched; a block's ``P'``) while a step runs.
``bench/memory.py`` checks the table against the bytes of every tensor alive on a CPU rank
after a real backward.

**Activations per micro-batch**, bytes per token per block, for bigtrain's block under bf16
autocast with fused attention (no ``T x T`` matrix kept; flash/efficient kernels on GPUs):
the residual stream enters each norm in fp32 (4d each, two norms) and the residual dropout
masks (1 byte per element, when dropout is on): with tp these are sequence-parallel, /tp.
The bf16 inputs of the attention and MLP projections (2d each) are all-gathered over the
sequence and kept whole on every tp rank (autograd saves the gathered input, as in
torchtitan). Inside attention and the MLP everything is split by heads or columns, /tp:
the output projection's input (2d), q, k, v and the attention output (2 bytes each: d,
kv_dim, kv_dim, d), the MLP's hidden activations (GELU: its input and output, 2 x 2f;
SwiGLU: gate, up, silu and product, 4 x 2f). The LM head keeps its gathered input (2d) and
fp32 log-probabilities (4V per token) and needs about twice that again at its peak in
backward; with ``parallel.loss_parallel`` the logits stay vocabulary-sharded (/tp), without
it they are gathered whole. Activation checkpointing (bigtrain/parallel/recompute.py) changes what a block keeps:
``full`` only its fp32 input (4d, /tp); ``op`` also the matmul and attention outputs (the
row-parallel ones whole: partial sums before their reduce-scatter), plus one block's worth
while it is recomputed.

**In flight** while a step runs. FSDP's root group (bigtrain/parallel/fsdp.py: the final norm,
learned positions and, unless ``parallel.vocab_table`` uses it on its shards, the token table
and head; ``R`` parameters per rank, the table's rows /tp) is gathered from the forward to the
end of the backward, and its unsharded gradient lives from the head's backward (the first) to
the end: ``2c R``. On top of that, either a block's unsharded gradients in backward (the compute
dtype and the fp32 copy it reduce-scatters: ``c + 4`` bytes per block parameter; 4 in fp32) or,
at the end, the root's fp32 copy (``4 R`` under bf16), whichever is larger. With the table on its
shards, the exchange instead: two copies of the micro-batch's logits and the hidden states of
every rank (``c (2 tokens V + 2 dp tokens d)``, :func:`bigtrain.parallel.vocab_parallel.pays`).
With tp > 1, one all-gathered input and one unreduced row-parallel output (2 x 2d per token):
TP's communication buffers. Without sharding (backend ``none``), bf16 autocast's copies of the
fp32 weights of every matmul (the blocks' projections and the head), which autograd keeps from
the forward to the backward: 2 bytes a parameter. (DeepSpeed's parameters are bf16 already.)

**Time**: tokens/s = MFU x peak x GPUs / FLOPs per token (``GPT.flops_per_token``, the
MFU formula), at the stated MFU (default 0.40, a well-tuned dense run; TP's communication
is part of what that MFU assumes); the peak is the datasheet's (bigtrain/peak.py). Days =
max_steps x tokens per step / tokens/s.

**Suggestion**: a layout whose total fits in 90% of the GPU's memory, cheapest first. ``tp``
is one of 1, 2, 4, 8 (within one node of 8 GPUs) that the tensor-parallel plan accepts
(``check_tp``: FSDP, tp dividing the GPUs, heads, key/value heads, MLP width and sequence);
the loss is vocabulary-parallel where tp divides the vocabulary.
Recomputing the cheap ops (``op``) costs a few percent, tensor parallelism inside a node
more (it communicates in every layer), recomputing whole blocks (``full``) a third more
compute. So: the smallest tp at which no recompute or ``op`` fits, else the
smallest tp at which ``full`` fits; at that tp, ``none`` before ``op``, at the largest
micro-batch (dividing the global batch per data-parallel rank, at least 4 where possible).
When nothing fits, the plan says so and names the fewest GPUs (doubling ``--gpus``) at
which something does.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

from bigtrain.config import Config, ConfigError
from bigtrain.model.gpt import GPT
from bigtrain.parallel.fsdp import vocab_sharded
from bigtrain.parallel.tp import check_tp
from bigtrain.peak import gpu_peak

GiB = 2**30
# Memory per GPU (GiB) by device name, first match wins (more specific names first).
GPU_MEMORY_GIB = [(("H200", "NVL"), 141), (("H200",), 141), (("H100", "NVL"), 94), (("H100",), 80),
                  (("A100", "40GB"), 40), (("A100",), 80), (("L40S",), 48), (("L4",), 24), (("A10G",), 24),
                  (("V100", "16GB"), 16), (("V100",), 32)]
# The suggestion's order of preference: recomputing the cheap ops (op) costs a few percent,
# TP inside a node some more, recomputing whole blocks (full) a third more compute.
TIERS = (("none", "op"), ("full",))
TP_SIZES = (1, 2, 4, 8)  # tensor parallelism stays inside one 8-GPU node (NVLink)
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
    """Parameters of the whole model and of one block, from the config alone; each split into
    what tensor parallelism shards (``sharded``) and what every tp rank holds whole."""
    m = cfg.model
    d, f, V, kv, bias = m.d_model, m.ffn_dim, m.vocab_size, m.kv_dim, int(m.bias)
    inputs = 2 if m.mlp == "swiglu" else 1  # gate and up, or fc
    attn = d * (d + 2 * kv) + bias * (d + 2 * kv) + d * d  # q, k, v column-wise; proj row-wise
    mlp = (inputs + 1) * d * f + bias * inputs * f       # fc / gate, up column-wise; proj row-wise
    norm = d * (1 + (bias if m.norm == "layernorm" else 0))
    block_whole = 2 * norm + (2 * m.head_dim if m.qk_norm else 0) + bias * 2 * d  # norms, row-parallel biases
    embed = V * d * (1 if m.tie_embeddings else 2)       # token table and head: vocabulary rows
    sharded = m.n_layer * (attn + mlp) + embed
    whole = m.n_layer * block_whole + norm + (m.seq_len * d if m.pos == "learned" else 0)
    return {"total": sharded + whole, "block": attn + mlp + block_whole, "sharded": sharded, "whole": whole,
            "block_sharded": attn + mlp, "block_whole": block_whole}


def state_bytes(cfg: Config, dp: int, tp: int = 1) -> dict:
    """Bytes per rank of parameters, gradients, optimizer state and buffers (the table above)."""
    counts = param_counts(cfg)
    P = counts["sharded"] / tp + counts["whole"]
    block = counts["block_sharded"] / tp + counts["block_whole"]
    p = cfg.parallel
    c = 2 if p.precision == "bf16" else 4
    if p.backend == "none":
        return {"params": 4 * P, "grads": 4 * P, "optimizer": 8 * P, "buffers": 0}
    if p.backend == "fsdp":
        return {"params": 4 * P / dp, "grads": 4 * P / dp, "optimizer": 8 * P / dp, "buffers": 2 * c * block}
    params = (c + 4) * P / dp if p.zero_stage == 3 else c * P + 4 * P / dp
    buckets = 2 * c * cfg.model.d_model ** 2
    return {"params": params, "grads": c * P / dp, "optimizer": 8 * P / dp, "buffers": buckets}


def activation_bytes(cfg: Config, micro: int, policy: str, tp: int = 1, loss_parallel: bool = False) -> float:
    """Peak activation bytes of one micro-batch on one rank under checkpointing ``policy``."""
    m, k = cfg.model, cfg.parallel.checkpoint_every
    d, f, V, kv, tokens = m.d_model, m.ffn_dim, m.vocab_size, m.kv_dim, micro * m.seq_len
    a = 2 if cfg.parallel.precision == "bf16" else 4
    hidden = (4 if m.mlp == "swiglu" else 2) * a * f
    sequence = 2 * 4 * d + (2 * d if m.dropout > 0 else 0)  # norm inputs, dropout masks: /tp
    gathered = 2 * a * d                                     # inputs of attention and MLP: whole
    inner = a * d + a * (2 * d + 2 * kv) + hidden + (a * (d + kv) if m.qk_norm else 0)  # /tp
    block = sequence / tp + gathered + inner / tp
    matmul_outputs = (a * (d + 2 * kv) + a * d + (2 if m.mlp == "swiglu" else 1) * a * f) / tp + 2 * a * d
    kept = {"full": 4 * d / tp, "op": 4 * d / tp + matmul_outputs}
    if policy == "none":
        per_layer = [block] * m.n_layer
    else:
        per_layer = [kept[policy] if i % k == 0 else block for i in range(m.n_layer)]
        per_layer[0] += block  # one block's worth while it is recomputed in backward
    # fp32 log-probabilities kept, and about twice that at the backward peak
    head = 4 * d / tp + a * d + 12 * V / (tp if loss_parallel else 1)
    return tokens * (sum(per_layer) + head)


def root_params(cfg: Config, tp: int, table_sharded: bool) -> float:
    """Parameters per rank of FSDP's root group: what the blocks and (when used on its shards)
    the token table leave, the table's vocabulary rows split over tp."""
    m, counts = cfg.model, param_counts(cfg)
    table = m.vocab_size * m.d_model * (1 if m.tie_embeddings else 2)
    rest = counts["total"] - m.n_layer * counts["block"] - table  # final norm, learned positions
    return rest + (0 if table_sharded else table / tp)


def in_flight_bytes(cfg: Config, micro: int, tp: int = 1, dp: int = 1) -> float:
    """Buffers alive only while a step runs (the module docstring's In flight): FSDP's gathered
    root and its gradient, a block's unsharded gradients or the root's reduce copy, the sharded
    table's exchange, TP's communication buffers."""
    m, p = cfg.model, cfg.parallel
    a = 2 if p.precision == "bf16" else 4
    tokens = micro * m.seq_len
    tp_buffers = 2 * a * m.d_model * tokens if tp > 1 else 0
    counts = param_counts(cfg)
    if p.backend == "none":  # bf16 autocast's copies of the fp32 matmul weights, kept for backward
        return 2 * (m.n_layer * counts["block_sharded"] + m.vocab_size * m.d_model) if a == 2 else 0
    if p.backend != "fsdp":
        return tp_buffers
    block = counts["block_sharded"] / tp + counts["block_whole"]
    unsharded = a + 4 if a == 2 else 4  # bf16: the gradient and its fp32 copy; fp32: one
    sharded = vocab_sharded(cfg, dp, micro, tp)
    root = root_params(cfg, tp, sharded)
    exchange = a * (2 * tokens * m.vocab_size + 2 * dp * tokens * m.d_model) if sharded else 0
    return 2 * a * root + max((4 if a == 2 else 0) * root, unsharded * block) + exchange + tp_buffers


@dataclass
class Estimate:
    gpus: int
    gpu: str
    backend: str
    tp: int
    dp: int
    loss_parallel: bool
    global_size: int
    micro_size: int
    activation_checkpointing: str
    params: int
    state_gib: dict
    activations_gib: float
    in_flight_gib: float
    total_gib: float
    gpu_gib: float
    fits: bool
    tokens_per_s: float = 0.0
    days: float = 0.0
    mfu: float = 0.0
    peak: str = ""


def memory(cfg: Config, gpus: int, gpu: str, micro: int, policy: str, tp: int, loss_parallel: bool) -> Estimate:
    """Per-rank memory of one layout (the time fields are :func:`timed`'s)."""
    state = state_bytes(cfg, gpus // tp, tp)
    act = activation_bytes(cfg, micro, policy, tp, loss_parallel)
    flight = in_flight_bytes(cfg, micro, tp, gpus // tp)
    total, capacity = sum(state.values()) + act + flight, gpu_memory_gib(gpu)
    backend = cfg.parallel.backend + (f"-zero{cfg.parallel.zero_stage}" if cfg.parallel.backend == "deepspeed" else "")
    return Estimate(gpus, gpu, backend, tp, gpus // tp, loss_parallel, cfg.batch.global_size, micro, policy,
                    param_counts(cfg)["total"], {k: round(v / GiB, 4) for k, v in state.items()},
                    round(act / GiB, 3), round(flight / GiB, 3), round(total / GiB, 3), capacity,
                    total <= HEADROOM * capacity * GiB)


def timed(cfg: Config, est: Estimate, mfu: float, flops_per_token: float) -> Estimate:
    """``est`` with tokens/s and days at ``mfu`` (the module docstring's Time)."""
    peak = gpu_peak(est.gpu, cfg.parallel.precision)
    tokens_per_s = mfu * peak.flops * est.gpus / flops_per_token
    days = cfg.schedule.max_steps * cfg.batch.global_size * cfg.model.seq_len / tokens_per_s / 86400
    return replace(est, tokens_per_s=round(tokens_per_s), days=round(days, 2), mfu=mfu, peak=peak.source)


def flops_per_token(cfg: Config) -> float:
    with torch.device("meta"):  # a model that allocates nothing
        return GPT(cfg.model).flops_per_token()


def estimate(cfg: Config, gpus: int, gpu: str, mfu: float, micro: int | None = None,
             policy: str | None = None, tp: int | None = None, loss_parallel: bool | None = None) -> Estimate:
    """One layout: the config's, with any of micro-batch, checkpointing policy and tp replaced."""
    p = cfg.parallel
    est = memory(cfg, gpus, gpu, micro or cfg.batch.micro_size, policy or p.activation_checkpointing,
                 tp or p.tp, p.loss_parallel if loss_parallel is None else loss_parallel)
    return timed(cfg, est, mfu, flops_per_token(cfg))


def tp_choices(cfg: Config, gpus: int) -> list[tuple[int, bool]]:
    """(tp, loss_parallel) the suggestion may try, smallest tp first: the layouts the tensor-parallel
    plan accepts on ``gpus`` (:func:`bigtrain.parallel.tp.check_tp`), the loss vocabulary-parallel
    where it can be."""
    choices = []
    for tp in TP_SIZES:
        for loss_parallel in (True, False) if tp > 1 else (False,):
            layout = cfg.model_copy(update={"parallel": cfg.parallel.model_copy(
                update={"tp": tp, "loss_parallel": loss_parallel})})
            try:
                check_tp(layout, gpus)
            except ConfigError:
                continue
            choices.append((tp, loss_parallel))
            break
    return choices


def fitting(cfg: Config, gpus: int, gpu: str) -> Estimate | None:
    """The suggested layout's memory (the module docstring's rule), or None if nothing fits."""
    for policies in TIERS:
        for tp, loss_parallel in tp_choices(cfg, gpus):
            dp = gpus // tp
            per_rank = cfg.batch.global_size // dp if cfg.batch.global_size % dp == 0 else 0
            micros = [b for b in (2 ** i for i in range(12, -1, -1)) if per_rank and per_rank % b == 0]
            preferred = [b for b in micros if b >= min(MIN_MICRO, per_rank)]
            for candidates in (preferred, micros):
                for policy in policies:
                    for micro in candidates:
                        est = memory(cfg, gpus, gpu, micro, policy, tp, loss_parallel)
                        if est.fits:
                            return est
    return None


def fewest_gpus(cfg: Config, gpus: int, gpu: str) -> int | None:
    """The fewest GPUs (doubling from ``gpus``) at which some layout fits; None past 65,536."""
    while gpus <= 65536:
        gpus *= 2
        if fitting(cfg, gpus, gpu) is not None:
            return gpus
    return None


def render(s: Estimate, best: Estimate | None, needs: int | None) -> str:
    lines = [f"bigtrain plan: {s.params / 1e9:.2f}B parameters on {s.gpus} x {s.gpu} ({s.gpu_gib} GiB), "
             f"backend {s.backend}, tp {s.tp} x dp {s.dp}",
             "  per rank: " + " + ".join(f"{k} {v:.2f}" for k, v in s.state_gib.items()) + " GiB",
             f"  activations (micro_size {s.micro_size}, checkpointing {s.activation_checkpointing}"
             + (f", loss_parallel {str(s.loss_parallel).lower()}" if s.tp > 1 else "")
             + f"): {s.activations_gib:.2f} GiB + in flight {s.in_flight_gib:.2f} GiB -> total {s.total_gib:.2f} GiB: "
             + ("fits" if s.fits else f"does NOT fit in {HEADROOM:.0%} of {s.gpu_gib} GiB")]
    if s.global_size % (s.micro_size * s.dp):
        lines.append(f"  batch.global_size={s.global_size} is not a multiple of micro_size x dp = "
                     f"{s.micro_size * s.dp}: the run would refuse this layout")
    lines.append(f"  at MFU {s.mfu:.0%}: {s.tokens_per_s:,.0f} tokens/s, {s.days} days to schedule.max_steps "
                 f"(peak: {s.peak})")
    if best is None:
        lines.append(f"  suggestion: nothing fits on {s.gpus} x {s.gpu}, not even with full checkpointing "
                     f"and the largest tp; " + (f"use at least {needs} GPUs" if needs else "use larger GPUs"))
    elif (best.tp, best.loss_parallel, best.micro_size, best.activation_checkpointing) == \
            (s.tp, s.loss_parallel, s.micro_size, s.activation_checkpointing):
        lines.append("  suggestion: keep this layout")
    else:
        keys = [f"parallel.tp={best.tp}"] if best.backend == "fsdp" else []
        keys += [f"parallel.loss_parallel={str(best.loss_parallel).lower()}"] if best.tp > 1 else []
        keys += [f"batch.micro_size={best.micro_size}",
                 f"parallel.activation_checkpointing={best.activation_checkpointing}"]
        lines.append(f"  suggestion: {' '.join(keys)} ({best.total_gib:.2f} GiB)")
    return "\n".join(lines)


def plan(cfg: Config, gpus: int, gpu: str, mfu: float) -> dict:
    p = cfg.parallel
    if gpus < 1:
        raise ConfigError(f"plan: --gpus {gpus} must be at least 1")
    if gpus % p.tp:
        raise ConfigError(f"plan: --gpus {gpus} is not a multiple of parallel.tp={p.tp}")
    check_tp(cfg, gpus)  # the rest of the configured layout, as `bigtrain train` checks it
    if not 0 < mfu <= 1:
        raise ConfigError(f"plan: --mfu {mfu} must be in (0, 1]")
    if not isinstance(cfg.model.vocab_size, int):
        raise ConfigError("plan: model.vocab_size is auto and no prepared data is here; set model.vocab_size")
    gpu_memory_gib(gpu)  # an unknown GPU is one line before any arithmetic
    flops = flops_per_token(cfg)
    current = timed(cfg, memory(cfg, gpus, gpu, cfg.batch.micro_size, p.activation_checkpointing, p.tp,
                                p.loss_parallel), mfu, flops)
    best = fitting(cfg, gpus, gpu)
    best = best and timed(cfg, best, mfu, flops)
    needs = None if best else fewest_gpus(cfg, gpus, gpu)
    return {"current": asdict(current), "suggestion": asdict(best) if best else None, "needs_gpus": needs,
            "text": render(current, best, needs)}
