"""Hugging Face's format for bigtrain's model, in both directions.

bigtrain's GPT computes exactly the function of two Hugging Face classes:

* gpt2-style (layernorm, gelu, learned positions, biases, tied head) is a
  ``GPT2LMHeadModel``. GPT-2's ``Conv1D`` stores weights as ``[in, out]``, the
  transpose of ``nn.Linear``; its fused ``c_attn`` is our ``q``, ``k``, ``v`` side by
  side (GPT-2 has no grouped-query attention: ``n_kv_head`` must equal ``n_head``).
* llama-style (rmsnorm, swiglu, rope, no biases; tied head or not) is a
  ``LlamaForCausalLM``: our ``q``, ``k``, ``v`` are its ``q_proj``, ``k_proj``, ``v_proj``
  (``n_kv_head`` is its ``num_key_value_heads``); our rope rotates halves
  (``rotate_half``), as HF LLaMA does, so no permutation.

This module holds the correspondence once: the config (:func:`hf_config` one way,
:func:`model_fields` the other) and, for each of our parameters, the HF tensors it is
made of and their layout (:func:`hf_places`, applied by :func:`to_hf` and
:func:`from_hf`). ``bigtrain export`` and ``model.init_from`` (:mod:`bigtrain.hf_import`)
both read it, so HF -> bigtrain -> HF is the identity, bit for bit.

It does not import the config schema (the schema calls :func:`model_fields` while
loading a config that has ``model.init_from``); ``cfg`` is any object with
``ModelConfig``'s attributes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from bigtrain.errors import ConfigError

ARCHITECTURES = {
    "GPT2LMHeadModel": dict(norm="layernorm", mlp="gelu", pos="learned", bias=True, tie_embeddings=True,
                            qk_norm=False),
    "LlamaForCausalLM": dict(norm="rmsnorm", mlp="swiglu", pos="rope", bias=False, qk_norm=False),
}
MODEL_TYPES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}  # a config.json without `architectures`


def hf_architecture(cfg) -> str:
    """The HF class that computes this model, or :class:`ConfigError` saying why none does."""
    differences = {name: [f"model.{k}={v!r}" for k, v in want.items() if getattr(cfg, k) != v]
                   for name, want in ARCHITECTURES.items()}
    if cfg.kv_heads != cfg.n_head:  # GPT-2's fused c_attn has as many key/value heads as query heads
        differences["GPT2LMHeadModel"].append(f"model.n_kv_head={cfg.n_head}")
    for name, diff in differences.items():
        if not diff:
            return name
    nearest = min(differences, key=lambda n: len(differences[n]))
    raise ConfigError(f"export: no Hugging Face class computes this model; the nearest, {nearest}, "
                      f"needs {', '.join(differences[nearest])}")


def hf_config(cfg, eot_id: int | None = None):
    """The ``transformers`` config of the equivalent HF model (dropout off: an export is for inference)."""
    import transformers
    arch = hf_architecture(cfg)
    special = {"bos_token_id": eot_id, "eos_token_id": eot_id} if eot_id is not None else {}
    if arch == "GPT2LMHeadModel":
        config = transformers.GPT2Config(
            vocab_size=cfg.vocab_size, n_positions=cfg.seq_len, n_embd=cfg.d_model, n_layer=cfg.n_layer,
            n_head=cfg.n_head, n_inner=cfg.ffn_dim, activation_function="gelu_new",
            layer_norm_epsilon=cfg.norm_eps, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            tie_word_embeddings=True, **special)
    else:
        config = transformers.LlamaConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_dim,
            num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.kv_heads,
            max_position_embeddings=cfg.seq_len, rms_norm_eps=cfg.norm_eps, hidden_act="silu",
            rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
            attention_bias=False, mlp_bias=False, tie_word_embeddings=cfg.tie_embeddings, **special)
    config.architectures = [arch]
    return config


# ---------------------------------------------------------------- HF config -> ours

def read_hf_config(directory: str):
    """``directory``'s config.json through ``transformers`` (which fills the defaults of its version)."""
    if not (Path(directory) / "config.json").is_file():
        raise ConfigError(f"model.init_from {directory!r}: no config.json there; expected a Hugging Face "
                          "model directory (save_pretrained)")
    import transformers
    try:
        return transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"model.init_from {directory!r}: config.json is not a transformers config "
                          f"({first})") from None


def _gpt2(c) -> tuple[dict, list[str]]:
    unsupported = [f"activation_function={c.activation_function!r} (bigtrain's GELU is the tanh one, gelu_new)"
                   ] if c.activation_function not in ("gelu_new", "gelu_pytorch_tanh") else []
    unsupported += [text for bad, text in [
        (not c.scale_attn_weights, "scale_attn_weights=False"),
        (c.scale_attn_by_inverse_layer_idx, "scale_attn_by_inverse_layer_idx=True"),
        (c.add_cross_attention, "add_cross_attention=True"),
        (not c.tie_word_embeddings, "tie_word_embeddings=False")] if bad]
    fields = dict(n_layer=c.n_layer, n_head=c.n_head, n_kv_head=None, d_model=c.n_embd,
                  d_ff=c.n_inner or 4 * c.n_embd,
                  seq_len=c.n_positions, vocab_size=c.vocab_size, norm_eps=c.layer_norm_epsilon)
    return fields, unsupported


def _llama(c) -> tuple[dict, list[str]]:
    rope = getattr(c, "rope_parameters", None) or {  # transformers 5 | 4
        "rope_type": (getattr(c, "rope_scaling", None) or {}).get("rope_type", "default"), "rope_theta": c.rope_theta}
    kv = c.num_key_value_heads or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    unsupported = [text for bad, text in [
        (c.num_attention_heads % kv, f"num_key_value_heads={kv} not dividing num_attention_heads"),
        (head_dim * c.num_attention_heads != c.hidden_size, f"head_dim={head_dim} != hidden_size / heads"),
        (c.hidden_act != "silu", f"hidden_act={c.hidden_act!r}"),
        (c.attention_bias, "attention_bias=True"),
        (getattr(c, "mlp_bias", False), "mlp_bias=True"),
        (rope.get("rope_type", "default") != "default", f"rope scaling {rope.get('rope_type')!r}")] if bad]
    fields = dict(n_layer=c.num_hidden_layers, n_head=c.num_attention_heads,
                  n_kv_head=kv if kv != c.num_attention_heads else None, d_model=c.hidden_size,
                  d_ff=c.intermediate_size, seq_len=c.max_position_embeddings, vocab_size=c.vocab_size,
                  norm_eps=c.rms_norm_eps, rope_theta=float(rope["rope_theta"]),
                  tie_embeddings=bool(c.tie_word_embeddings))
    return fields, unsupported


def model_fields(directory: str, given: dict) -> dict:
    """The model section for ``model.init_from: directory``: ``given`` (the keys the config set)
    with every architecture key taken from the directory's config.json.

    A given key that contradicts the weights is an error, not silently overridden (a config that
    says ``n_layer: 24`` expects 24 layers). One exception: with rope, ``seq_len`` may be set
    below ``max_position_embeddings`` (train on shorter context than the model supports); a
    learned position table has exactly ``n_positions`` rows. Dropout, z-loss and init_std stay ours.
    """
    c = read_hf_config(directory)
    arch = (getattr(c, "architectures", None) or [None])[0] or MODEL_TYPES.get(c.model_type)
    if arch not in ARCHITECTURES:
        raise ConfigError(f"model.init_from {directory!r}: {arch or c.model_type} is not supported; bigtrain "
                          f"trains {' and '.join(ARCHITECTURES)}")
    fields, unsupported = (_gpt2 if arch == "GPT2LMHeadModel" else _llama)(c)
    if unsupported:
        raise ConfigError(f"model.init_from {directory!r}: this {arch} uses what bigtrain's model does not "
                          f"compute: {'; '.join(unsupported)}")
    fields = {**ARCHITECTURES[arch], **fields}
    if arch == "LlamaForCausalLM" and isinstance(given.get("seq_len"), int) and given["seq_len"] <= fields["seq_len"]:
        fields["seq_len"] = given["seq_len"]
    clash = [k for k, v in fields.items() if k in given and given[k] not in (v, "auto")]  # vocab_size: auto
    if clash:
        theirs = ", ".join(f"{k}={fields[k]!r}" for k in clash)
        ours = ", ".join(f"model.{k}={given[k]!r}" for k in clash)
        raise ConfigError(f"config error: model.init_from {directory!r} is a {arch} with {theirs} but the config "
                          f"says {ours}; leave these keys out, the weights decide them")
    return {**given, **fields}


# ---------------------------------------------------------------- parameter names and layouts

SAME, TRANSPOSED = "same", "transposed"


@dataclass(frozen=True)
class Place:
    """Where one of our parameters lives in an HF checkpoint: the HF tensor, its layout, and
    which part of it is ours. ``transposed``: GPT-2's ``Conv1D`` stores ``[in, out]``;
    ``part=(i, n)``: ours is the i-th of n equal row blocks of the (untransposed) HF tensor
    (our ``q``, ``k``, ``v`` in GPT-2's fused ``c_attn``)."""
    name: str
    layout: str = SAME
    part: tuple[int, int] | None = None


def hf_places(cfg) -> dict[str, Place]:
    """Every entry of ``GPT(cfg).state_dict()`` -> its :class:`Place`. A tied ``lm_head.weight``
    points at the embedding (HF ties it on load; safetensors stores no shared tensors)."""
    arch = hf_architecture(cfg)
    places: dict[str, Place] = {}
    if arch == "GPT2LMHeadModel":
        t = "transformer."
        places |= {"tok_emb.weight": Place(t + "wte.weight"), "pos_emb.weight": Place(t + "wpe.weight"),
                   "norm_f.weight": Place(t + "ln_f.weight"), "norm_f.bias": Place(t + "ln_f.bias"),
                   "lm_head.weight": Place(t + "wte.weight")}
        for i in range(cfg.n_layer):
            ours, theirs = f"blocks.{i}.", f"{t}h.{i}."
            for a, b in [("norm1", "ln_1"), ("norm2", "ln_2")]:
                places |= {f"{ours}{a}.{k}": Place(f"{theirs}{b}.{k}") for k in ("weight", "bias")}
            for a, b in [("attn.proj", "attn.c_proj"), ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")]:
                places[f"{ours}{a}.weight"] = Place(f"{theirs}{b}.weight", TRANSPOSED)
                places[f"{ours}{a}.bias"] = Place(f"{theirs}{b}.bias")
            for k, x in enumerate("qkv"):
                places[f"{ours}attn.{x}.weight"] = Place(f"{theirs}attn.c_attn.weight", TRANSPOSED, (k, 3))
                places[f"{ours}attn.{x}.bias"] = Place(f"{theirs}attn.c_attn.bias", SAME, (k, 3))
    else:
        m = "model."
        places |= {"tok_emb.weight": Place(m + "embed_tokens.weight"), "norm_f.weight": Place(m + "norm.weight"),
                   "lm_head.weight": Place(m + "embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight")}
        for i in range(cfg.n_layer):
            ours, theirs = f"blocks.{i}.", f"{m}layers.{i}."
            places |= {ours + a: Place(theirs + b) for a, b in [
                ("attn.q.weight", "self_attn.q_proj.weight"), ("attn.k.weight", "self_attn.k_proj.weight"),
                ("attn.v.weight", "self_attn.v_proj.weight"),
                ("attn.proj.weight", "self_attn.o_proj.weight"), ("mlp.gate.weight", "mlp.gate_proj.weight"),
                ("mlp.up.weight", "mlp.up_proj.weight"), ("mlp.proj.weight", "mlp.down_proj.weight"),
                ("norm1.weight", "input_layernorm.weight"), ("norm2.weight", "post_attention_layernorm.weight")]}
    return places


def to_hf(places: dict[str, Place], ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our tensors by name -> the HF tensors they make up (parts joined; a tied head's place is
    the embedding's, written once)."""
    pieces: dict[str, list[torch.Tensor | None]] = {}
    for name, place in places.items():
        i, n = place.part or (0, 1)
        slots = pieces.setdefault(place.name, [None] * n)
        if slots[i] is None:
            slots[i] = ours[name]
    layouts = {place.name: place.layout for place in places.values()}
    out = {}
    for hf_name, slots in pieces.items():
        whole = slots[0] if len(slots) == 1 else torch.cat(slots, dim=0)
        out[hf_name] = whole.T if layouts[hf_name] == TRANSPOSED else whole
    return out


def from_hf(place: Place, read: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """Our tensor, cut from the HF tensor of ``place`` that ``read(name)`` returns."""
    tensor = read(place.name)
    if place.layout == TRANSPOSED:
        tensor = tensor.T
    if place.part is not None:
        i, n = place.part
        tensor = tensor.chunk(n, dim=0)[i]
    return tensor.contiguous()
