"""Hugging Face export: a checkpoint becomes a directory ``transformers`` loads.

bigtrain's GPT computes exactly the function of two Hugging Face classes:

* gpt2-style (layernorm, gelu, learned positions, biases, tied head) is a
  ``GPT2LMHeadModel``. GPT-2's ``Conv1D`` stores weights as ``[in, out]``, the
  transpose of ``nn.Linear``; our fused ``qkv`` is its ``c_attn`` as is.
* llama-style (rmsnorm, swiglu, rope, no biases; tied head or not) is a
  ``LlamaForCausalLM``. Our fused ``qkv`` rows are q, k, v, each split into heads
  contiguously, so its three row blocks are ``q_proj``, ``k_proj``, ``v_proj``;
  our rope rotates halves (``rotate_half``), as HF LLaMA does, so no permutation.

Any other combination (QK-norm, a learned position table with SwiGLU, ...) has
no HF class computing the same function, and export refuses, naming the options
that differ from the nearest architecture. The weights come consolidated from
any backend and world size (:func:`bigtrain.checkpoint.load_model`), and go out
as ``model.safetensors`` with ``config.json`` and the data's tokenizer files.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from bigtrain.config import ConfigError, ModelConfig

ARCHITECTURES = {
    "GPT2LMHeadModel": dict(norm="layernorm", mlp="gelu", pos="learned", bias=True, tie_embeddings=True,
                            qk_norm=False),
    "LlamaForCausalLM": dict(norm="rmsnorm", mlp="swiglu", pos="rope", bias=False, qk_norm=False),
}


def hf_architecture(cfg: ModelConfig) -> str:
    """The HF class that computes this model, or :class:`ConfigError` saying why none does."""
    differences = {name: [f"model.{k}={v!r}" for k, v in want.items() if getattr(cfg, k) != v]
                   for name, want in ARCHITECTURES.items()}
    for name, diff in differences.items():
        if not diff:
            return name
    nearest = min(differences, key=lambda n: len(differences[n]))
    raise ConfigError(f"export: no Hugging Face class computes this model; the nearest, {nearest}, "
                      f"needs {', '.join(differences[nearest])}")


def hf_config(cfg: ModelConfig, eot_id: int | None = None):
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
            num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_head,
            max_position_embeddings=cfg.seq_len, rms_norm_eps=cfg.norm_eps, hidden_act="silu",
            rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
            attention_bias=False, mlp_bias=False, tie_word_embeddings=cfg.tie_embeddings, **special)
    config.architectures = [arch]
    return config


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    """``model``'s weights under HF names (fp32, contiguous). A tied head is left out:
    HF ties it to the embedding on load, and safetensors stores no shared tensors."""
    c = model.cfg
    arch = hf_architecture(c)
    sd: dict[str, torch.Tensor] = {}
    if arch == "GPT2LMHeadModel":
        sd |= {"transformer.wte.weight": model.tok_emb.weight, "transformer.wpe.weight": model.pos_emb.weight,
               "transformer.ln_f.weight": model.norm_f.weight, "transformer.ln_f.bias": model.norm_f.bias}
        for i, b in enumerate(model.blocks):
            p = f"transformer.h.{i}."
            for ours, theirs in [(b.norm1, "ln_1"), (b.norm2, "ln_2")]:
                sd[p + theirs + ".weight"], sd[p + theirs + ".bias"] = ours.weight, ours.bias
            for ours, theirs in [(b.attn.qkv, "attn.c_attn"), (b.attn.proj, "attn.c_proj"),
                                 (b.mlp.fc, "mlp.c_fc"), (b.mlp.proj, "mlp.c_proj")]:
                sd[p + theirs + ".weight"], sd[p + theirs + ".bias"] = ours.weight.T, ours.bias
    else:
        sd |= {"model.embed_tokens.weight": model.tok_emb.weight, "model.norm.weight": model.norm_f.weight}
        if not c.tie_embeddings:
            sd["lm_head.weight"] = model.lm_head.weight
        for i, b in enumerate(model.blocks):
            p = f"model.layers.{i}."
            q, k, v = b.attn.qkv.weight.chunk(3, dim=0)
            sd |= {p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
                   p + "self_attn.v_proj.weight": v, p + "self_attn.o_proj.weight": b.attn.proj.weight,
                   p + "mlp.gate_proj.weight": b.mlp.gate.weight, p + "mlp.up_proj.weight": b.mlp.up.weight,
                   p + "mlp.down_proj.weight": b.mlp.proj.weight,
                   p + "input_layernorm.weight": b.norm1.weight,
                   p + "post_attention_layernorm.weight": b.norm2.weight}
    return {k: v.detach().float().contiguous().clone() for k, v in sd.items()}


def to_hf(model):
    """An in-memory HF model with ``model``'s weights (eval mode), e.g. to compare logits."""
    import transformers
    config = hf_config(model.cfg)
    hf = getattr(transformers, config.architectures[0])(config)
    missing, unexpected = hf.load_state_dict(hf_state_dict(model), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"HF weight mapping is incomplete: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    return hf.eval()


def data_tokenizer(directory: Path):
    """The tokenizer of a prepared data dir (its ``tokenizer/``), or of a tokenizer dir itself.
    Only the manifest is read: export must not hash a terabyte of shards."""
    from bigtrain.data.tokenizer import META, load_tokenizer
    if (directory / META).is_file():
        return load_tokenizer(directory)
    try:
        sub = json.loads((directory / "manifest.json").read_text())["tokenizer"].get("dir", "tokenizer")
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"export: no tokenizer in {str(directory)!r} ({type(e).__name__}); "
                          "pass --tokenizer with a prepared data dir") from None
    return load_tokenizer(directory / sub)


def export(run_dir: str | Path, out: str | Path, step: int | None = None, tokenizer: str | Path | None = None,
           overwrite: bool = False, ema: bool = False) -> Path:
    """Write ``config.json``, ``model.safetensors`` and the tokenizer files of ``run_dir``'s
    checkpoint (the newest, or ``step``) into ``out``; with ``ema``, its EMA of the weights.
    Refuses to write into a non-empty ``out``."""
    from safetensors.torch import save_file

    from bigtrain.checkpoint import find, load_model
    from bigtrain.checkpoint.format import read_meta

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"export: {str(out)!r} exists and is not empty; pass --overwrite or another --out")
    path = find(run_dir, step)
    meta = read_meta(path)
    cfg = ModelConfig.model_validate(meta["config"]["model"])
    hf_architecture(cfg)  # refuse before reading any weights
    tok = data_tokenizer(Path(tokenizer or meta["config"]["data"]["path"]))
    if tok.vocab_size > cfg.vocab_size:
        raise ConfigError(f"export: the tokenizer has {tok.vocab_size} tokens, the model only {cfg.vocab_size}")
    model = load_model(path, ema=ema)
    out.mkdir(parents=True, exist_ok=True)
    hf_config(cfg, tok.eot_id).save_pretrained(out)
    save_file(hf_state_dict(model), str(out / "model.safetensors"), metadata={"format": "pt"})
    tok.save_hf(out)
    source = {"checkpoint": str(path.resolve()), "step": meta["step"], "bigtrain_model": meta["config"]["model"],
              "ema": ema}
    (out / "bigtrain_export.json").write_text(json.dumps(source, indent=1) + "\n")
    return out
