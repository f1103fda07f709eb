"""``model.init_from``: continued pretraining from a local Hugging Face directory.

A ``GPT2LMHeadModel`` or ``LlamaForCausalLM`` directory (``save_pretrained``: config.json
and safetensors) is taken in three steps, each where the run already does that kind of work:

1. Loading the config: the directory's config.json decides the architecture keys
   (:func:`bigtrain.config.adopt_init_from` with :func:`bigtrain.hf_format.model_fields`).
2. Opening the data (:func:`open_weights`, before the run writes anything): the data must
   be tokenized with the weights' tokenizer (:func:`check_data`): the same vocabulary size
   and, where the directory holds a ``tokenizer.json``, the same ids; the safetensors must
   hold every tensor the architecture needs and nothing else. The directory itself is what
   ``bigtrain prepare --tokenizer DIR`` takes.
3. Building the model: :class:`HFWeights` is a *source*, ``name -> the full fp32 tensor of
   one of our parameters``, reading the safetensors lazily, one tensor at a time; it is
   what sharded initialisation (bigtrain/model/init.py, ``initial_weights``) materialises
   each rank's shards from, on every backend.

The names and layouts are :func:`bigtrain.hf_format.hf_places`, the table ``bigtrain
export`` writes with, so HF -> bigtrain -> ``bigtrain export`` is bitwise the identity.
``pytorch_model.bin`` is not read: unpickling runs code (``save_pretrained`` writes safetensors).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from bigtrain.data.tokenizer import fingerprint
from bigtrain.errors import ConfigError
from bigtrain.hf_format import from_hf, hf_places

# Buffers that older transformers versions saved with the weights (GPT-2's causal mask,
# LLaMA's rotary frequencies): derived from the config, so nothing to load.
DERIVED = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")
PREFIXES = ("transformer.", "model.")  # absent in checkpoints of the bare GPT2Model / LlamaModel


class HFWeights:
    """``source(name)``: our parameter ``name`` (e.g. ``blocks.0.attn.q.weight``) as a full fp32
    tensor, read from ``directory``'s safetensors on demand. Construction reads only the files'
    headers and checks that every tensor we need is there and nothing unknown is left over."""

    def __init__(self, directory: str | Path, cfg):
        self.directory = Path(directory)
        self.places = hf_places(cfg)
        files = self._weight_map()
        self.keys: dict[str, str] = {}  # an HF name in our table -> its key in the files
        for name in sorted({place.name for place in self.places.values()}):
            short = name.split(".", 1)[1] if name.startswith(PREFIXES) else name
            key = name if name in files else short if short in files else None
            if key is None:
                raise ConfigError(f"model.init_from {str(directory)!r}: the weights have no tensor {name!r}")
            self.keys[name] = key
        self.files = {key: files[key] for key in self.keys.values()}
        derived = DERIVED + (("lm_head.weight",) if cfg.tie_embeddings else ())  # a tied head saved anyway
        extra = sorted(k for k in files.keys() - self.files.keys() if not k.endswith(derived))
        if extra:
            raise ConfigError(f"model.init_from {str(directory)!r}: {len(extra)} tensor(s) that bigtrain's "
                              f"model has no place for, e.g. {extra[0]!r}")

    def _weight_map(self) -> dict[str, str]:
        """Tensor key -> the safetensors file that holds it (one file, or an index of shards)."""
        from safetensors import safe_open
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            return dict(json.loads(index.read_text())["weight_map"])
        single = self.directory / "model.safetensors"
        if not single.is_file():
            raise ConfigError(f"model.init_from {str(self.directory)!r}: no model.safetensors (or its index); "
                              "save the model with save_pretrained (safetensors)")
        with safe_open(single, framework="pt") as f:
            return {key: single.name for key in f.keys()}

    def _read(self, hf_name: str) -> torch.Tensor:
        from safetensors import safe_open
        key = self.keys[hf_name]
        with safe_open(self.directory / self.files[key], framework="pt") as f:
            return f.get_tensor(key)

    def __call__(self, name: str) -> torch.Tensor:
        return from_hf(self.places[name], self._read).float()


@torch.no_grad()
def open_weights(cfg, data) -> HFWeights:
    """``model.init_from``'s weights, checked against their config and ``data`` before the run
    writes anything (only the safetensors headers are read)."""
    check_data(cfg, data)
    return HFWeights(cfg.model.init_from, cfg.model)


def check_data(cfg, data) -> None:
    """The prepared ``data`` must speak the weights' vocabulary: a foreign one would index the
    embedding with ids that mean other tokens (or crash past its end)."""
    directory = cfg.model.init_from
    fix = f"; prepare the data with `bigtrain prepare --tokenizer {directory}`"
    if data.vocab_size != cfg.model.vocab_size:
        raise ConfigError(f"model.init_from {directory!r} has a vocabulary of {cfg.model.vocab_size} tokens, "
                          f"the data at {str(data.path)!r} {data.vocab_size}{fix}")
    if (Path(directory) / "tokenizer.json").is_file() and fingerprint(directory) != data.tokenizer_id:
        raise ConfigError(f"the data at {str(data.path)!r} was tokenized with another tokenizer than "
                          f"model.init_from {directory!r} (the same vocabulary size, other ids){fix}")
