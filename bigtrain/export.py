"""Hugging Face export: a checkpoint becomes a directory ``transformers`` loads.

The correspondence with the two HF classes bigtrain computes (``GPT2LMHeadModel``,
``LlamaForCausalLM``), config and parameter names and layouts, is
:mod:`bigtrain.hf_format`, shared with ``model.init_from``. Any other combination
of options (QK-norm, a learned position table with SwiGLU, ...) has no HF class
computing the same function, and export refuses, naming the options that differ
from the nearest architecture. The weights come consolidated from any backend and
world size (:func:`bigtrain.checkpoint.load_model`), and go out as
``model.safetensors`` with ``config.json`` and the data's tokenizer files.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from bigtrain.config import ConfigError, ModelConfig
from bigtrain.hf_format import hf_architecture, hf_config, hf_places, to_hf as place_to_hf

def hf_state_dict(model) -> dict[str, torch.Tensor]:
    """``model``'s weights under HF names (fp32, contiguous). A tied head is left out:
    HF ties it to the embedding on load, and safetensors stores no shared tensors."""
    sd = place_to_hf(hf_places(model.cfg), model.state_dict())
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
