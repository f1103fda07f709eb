"""The transformer: a GPT-style pre-norm decoder in one file, read top to bottom.

    x = drop(tok_emb(idx) [+ pos_emb(positions)])
    for each block:  x = x + attn(norm1(x));  x = x + mlp(norm2(x))
    logits = lm_head(norm_f(x))

Options (see ``ModelConfig``): LayerNorm or RMSNorm, GELU or SwiGLU MLP, learned
or rotary positions, biases on or off, QK-norm, dropout, tied embeddings, and
document masking (``doc_mask``: attention stays inside each document of a packed
window and positions restart after every end-of-document token, so each document
computes what it would alone; see :mod:`bigtrain.model.doc_mask`). Two
combinations are bit-for-bit the Hugging Face architectures we export to:
``layernorm + gelu + learned + bias`` is ``GPT2LMHeadModel`` (hence the tanh
GELU, GPT-2's "gelu_new") and ``rmsnorm + swiglu + rope + no bias`` is
``LlamaForCausalLM`` (hence HF's rotate-half RoPE convention).

Nothing distributed lives here: FSDP/DeepSpeed wrap this module from outside. The
init is a rule per parameter (:meth:`GPT.initial_value`) that
:mod:`bigtrain.model.init` applies, so a run builds this model on ``meta`` and each
rank materialises only its own shards; the loss is a free function returning sums.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from bigtrain.config import ModelConfig
from bigtrain.model.doc_mask import Documents, attend, find_documents
from bigtrain.model.init import materialize, normal_rows, seeded


def make_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    """LayerNorm (bias iff ``cfg.bias``) or RMSNorm (never a bias)."""
    if cfg.norm == "layernorm":
        return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.bias)
    return nn.RMSNorm(dim, eps=cfg.norm_eps)


def rope_cos_sin(cfg: ModelConfig, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape [seq_len, head_dim], computed in fp32 as HF LLaMA does.

    Frequencies ``theta ** (-arange(0, hd, 2) / hd)`` are repeated as
    ``cat([freqs, freqs])`` to pair with :func:`rotate_half`, not interleaved.
    """
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, device=device, dtype=torch.float32) / hd))
    positions = torch.arange(cfg.seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq)
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] over the last dimension (HF LLaMA's convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, H, T, hd] by position; cos/sin [T, hd] (or per row, [B, 1, T, hd]) broadcast."""
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    """Causal multi-head self-attention through ``F.scaled_dot_product_attention``
    (or, given ``docs``, within each document: :func:`bigtrain.model.doc_mask.attend`).

    Separate ``q``, ``k``, ``v`` projections, each split into heads contiguously (LLaMA's
    ``q_proj``/``k_proj``/``v_proj``; GPT-2's fused ``c_attn`` is the three side by side), so
    tensor parallelism can split each by heads (bigtrain/parallel/tp.py) and keys/values
    can have fewer heads than queries: grouped-query attention (``n_kv_head``), each k/v
    head serving ``n_head / n_kv_head`` query heads. Head counts are read from the
    projections' outputs in ``forward``, so a tensor-parallel rank computes its own heads.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim, self.dropout = cfg.head_dim, cfg.dropout
        self.q = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=cfg.bias)
        self.k = nn.Linear(cfg.d_model, cfg.kv_dim, bias=cfg.bias)
        self.v = nn.Linear(cfg.d_model, cfg.kv_dim, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        # QK-norm bounds the attention logits, a cheap guard against loss spikes.
        self.q_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                docs: Documents | None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = (proj(x).view(B, T, -1, self.head_dim) for proj in (self.q, self.k, self.v))  # [B, T, heads, hd]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, hd]
        if rope is not None:
            cos, sin = (t.to(q.dtype) for t in rope)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        dropout_p = self.dropout if self.training else 0.0
        if docs is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p,
                                               enable_gqa=k.size(1) != q.size(1))
        else:
            y = attend(q, k, v, docs, dropout_p)
        y = y.transpose(1, 2).reshape(B, T, -1)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    """GELU (tanh approximation, as GPT-2) ``proj(gelu(fc(x)))`` or SwiGLU ``proj(silu(gate(x)) * up(x))``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.mlp
        if self.kind == "gelu":
            self.fc = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=cfg.bias)
        else:
            self.gate = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=cfg.bias)
            self.up = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=cfg.bias)
        self.proj = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=cfg.bias)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "gelu":
            h = F.gelu(self.fc(x), approximate="tanh")
        else:
            h = F.silu(self.gate(x)) * self.up(x)
        return self.resid_drop(self.proj(h))


class Block(nn.Module):
    """One pre-norm residual block; FSDP shards (and checkpoints) at this granularity."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1 = make_norm(cfg, cfg.d_model)
        self.attn = Attention(cfg)
        self.norm2 = make_norm(cfg, cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                docs: Documents | None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope, docs)
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """The language model: token ids [B, T] in, logits [B, T, vocab] out (no loss inside).

    Built on a real device it is initialised at once (:meth:`init_weights`); built on
    ``meta``, or with ``init=False`` (DeepSpeed ZeRO-3 partitions it while it is built), it
    waits for :func:`bigtrain.model.init.materialize`.
    """

    def __init__(self, cfg: ModelConfig, init: bool = True):
        super().__init__()
        if not isinstance(cfg.vocab_size, int):
            raise ValueError("model.vocab_size is 'auto': resolve it from the prepared data's manifest "
                             "(or set an integer) before building the model")
        if cfg.doc_mask and not isinstance(cfg.eot_id, int):
            raise ValueError("model.doc_mask needs model.eot_id: resolve it from the prepared data's manifest "
                             "(or set an integer) before building the model")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model) if cfg.pos == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = make_norm(cfg, cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        # the lookup and the head on the table's FSDP shards (bigtrain/parallel/vocab_parallel.py),
        # set by the FSDP backend; None: the tok_emb and lm_head modules
        self.vocab_parallel = None
        if cfg.pos == "rope":
            # Derived from the config, so kept out of checkpoints (persistent=False).
            cos, sin = rope_cos_sin(cfg, self.tok_emb.weight.device)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        else:
            self.rope_cos = self.rope_sin = None
        if init and not self.tok_emb.weight.is_meta:
            self.init_weights()

    def init_weights(self, seed: int | None = None) -> None:
        """(Re)initialise in place with the seeded per-parameter init at ``seed`` (None:
        ``torch.initial_seed()``, the seed last given to ``torch.manual_seed``, so that
        ``torch.manual_seed(s); GPT(cfg)`` is the model a run with ``seed: s`` starts from).
        Works on a model built on ``meta`` and moved with ``to_empty`` too."""
        materialize(self, seeded(self, torch.initial_seed() if seed is None else seed))

    def initial_value(self, name: str, shape: torch.Size, generator: torch.Generator,
                      rows: slice = slice(None)) -> torch.Tensor:
        """Rows ``rows`` of parameter ``name`` as the project's init draws it whole: fp32, on the
        CPU; only those rows are computed (:func:`~bigtrain.model.init.normal_rows`).

        Linear and Embedding weights N(0, init_std); the two residual-stream writers
        (``attn.proj``, ``mlp.proj``) N(0, init_std / sqrt(2 * n_layer)) so the residual's
        variance does not grow with depth (GPT-2); biases zero; norm weights one.
        """
        owner, _, kind = name.rpartition(".")
        module = self.get_submodule(owner)
        if kind == "bias":
            return torch.zeros(shape)[rows]
        if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            return torch.ones(shape)[rows]
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            raise TypeError(f"no init rule for {name} ({type(module).__name__})")
        std = self.cfg.init_std
        if owner.endswith(("attn.proj", "mlp.proj")):
            std /= math.sqrt(2 * self.cfg.n_layer)
        return normal_rows(shape, std, generator, rows)

    def tie_weights(self) -> None:
        """Share the token table with the head (``tie_embeddings``); a plain ``to_empty`` gives
        each its own storage, FSDP2 and ZeRO-3 keep the tie."""
        if self.cfg.tie_embeddings and self.lm_head.weight is not self.tok_emb.weight:
            self.lm_head.weight = self.tok_emb.weight

    def share_tied_table(self) -> None:
        """Register a tied model's head under ``tok_emb`` too, so the shared table is one module's
        parameter, which FSDP can shard as a group of its own (while a parameter of two modules
        must sit in their common ancestor's group: the root). Only with :attr:`vocab_parallel`
        set, which uses the table without calling either module. Names and state-dict keys stay."""
        if self.cfg.tie_embeddings:
            self.tok_emb = self.lm_head

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Recompute the buffers that are not parameters (the RoPE tables): derived from the
        config, never saved, and garbage after ``to_empty``."""
        if self.rope_cos is not None:
            cos, sin = rope_cos_sin(self.cfg, self.rope_cos.device)
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        if T > self.cfg.seq_len:
            raise ValueError(f"sequence length {T} exceeds model.seq_len={self.cfg.seq_len}")
        if self.vocab_parallel is not None:
            x = self.vocab_parallel.lookup(idx, self.tok_emb.weight)
        else:
            self.tok_emb.sparse = self.sparse_lookup_grad(idx)  # read by the module's forward (its hooks: TP's)
            x = self.tok_emb(idx)
        docs = None
        if self.cfg.doc_mask:  # the documents in each row; x's dtype helps choose the attention kernel
            docs = find_documents(idx, self.cfg.eot_id, x.dtype, self.cfg.dropout if self.training else 0.0)
        # each token's position inside its document [B, T]; without doc_mask one arange for every row
        positions = docs.positions if docs is not None else torch.arange(T, device=idx.device)
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        x = self.drop(x)
        rope = None
        if self.rope_cos is not None:  # the tables' rows at those positions: [T, hd], or [B, 1, T, hd] per row
            at = positions if docs is None else positions.unsqueeze(1)
            rope = (self.rope_cos[at], self.rope_sin[at])
        for block in self.blocks:
            x = block(x, rope, docs)
        if self.vocab_parallel is not None:
            return self.vocab_parallel.head(self.norm_f(x), self.lm_head.weight)
        return self.lm_head(self.norm_f(x))

    def sparse_lookup_grad(self, idx: torch.Tensor) -> bool:
        """Whether the token lookup's gradient is sparse (the rows of the batch's tokens only).
        With a tied head, the head's dense gradient reaches the shared table first and the
        lookup's rows are added into it in place, instead of a dense zero table for the lookup
        plus another for the sum: 2 x 0.19 GiB less at the end of gpt2-350m's backward (peak
        RSS per rank of 4 FSDP ranks 2.62 -> 2.43 GiB) and less time (the 124M model's
        backward on this CPU: ~40 ms of 900). The table's gradient stays dense. On the CPU only
        (not yet measured on CUDA), and not under tensor parallelism (a DTensor table)."""
        return (self.cfg.tie_embeddings and idx.device.type == "cpu"
                and not isinstance(self.tok_emb.weight, DTensor))

    def num_params(self, non_embedding: bool = False) -> int:
        """Unique parameters (a tied head counted once). ``non_embedding`` leaves out the token
        and position tables and an untied ``lm_head`` (the Kaplan et al. convention)."""
        n = sum(p.numel() for p in self.parameters())  # parameters() already de-duplicates ties
        if non_embedding:
            n -= self.tok_emb.weight.numel()
            if self.pos_emb is not None:
                n -= self.pos_emb.weight.numel()
            if not self.cfg.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward), for MFU:
        ``6 * (N_non_embedding + V * d) + 12 * n_layer * d_model * seq_len``.

        The PaLM / torchtitan formula, with one choice written down: the LM head's matmul
        (``6 * V * d``) is always counted, tied or not, because it is real compute either way;
        the embedding lookups are gathers and are not. The attention term uses the full
        ``seq_len`` (no causal halving), as PaLM and torchtitan do, so MFUs compare.
        """
        c = self.cfg
        head = c.vocab_size * c.d_model
        return 6.0 * (self.num_params(non_embedding=True) + head) + 12.0 * c.n_layer * c.d_model * c.seq_len


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, z_loss: float = 0.0,
            rows: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ce_sum, z_sum)`` over all tokens, in fp32; with ``rows``, ``ce_sum`` per row (``[batch]``).

    Sums, not means: the trainer divides by the global token count, so the step's loss is the
    token-weighted mean over the whole global batch whatever the micro-batching and rank count.
    ``z_sum = z_loss * sum(logsumexp(logits) ** 2)`` (PaLM's z-loss) keeps the softmax normaliser
    near one; it is a zero tensor when ``z_loss == 0``.
    """
    batch = targets.shape[0]
    logits = logits.float().reshape(-1, logits.size(-1))
    targets = targets.reshape(-1)
    if rows:
        ce_sum = F.cross_entropy(logits, targets, reduction="none").view(batch, -1).sum(dim=1)
    else:
        ce_sum = F.cross_entropy(logits, targets, reduction="sum")
    if z_loss == 0.0:
        return ce_sum, torch.zeros((), device=logits.device)
    z_sum = z_loss * torch.logsumexp(logits, dim=-1).pow(2).sum()
    return ce_sum, z_sum
