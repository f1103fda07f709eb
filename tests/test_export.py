"""`bigtrain export`: a checkpoint round-trips through transformers for both exportable architectures."""
from __future__ import annotations

import pytest
import torch

from bigtrain.checkpoint import load_model
from bigtrain.cli import main
from bigtrain.config import ConfigError, ModelConfig
from bigtrain.data.dataset import open_data
from bigtrain.export import hf_architecture
from bigtrain.parallel.env import DistEnv
from bigtrain.trainer import Trainer
from helpers import tiny_config

CPU = DistEnv(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
GPT2 = dict(model__norm="layernorm", model__mlp="gelu", model__pos="learned", model__bias=True,
            model__tie_embeddings=True)
LLAMA = dict(model__norm="rmsnorm", model__mlp="swiglu", model__pos="rope", model__bias=False,
             model__tie_embeddings=False, model__rope_theta=500.0, model__norm_eps=1e-6)


def train(data: str, run_dir, **options) -> None:
    """A few steps, so the weights are away from the init (norm gains of 1 hide swapped norms)."""
    options = {"schedule__max_steps": 4, "optim__lr": 1e-2, **options}
    trainer = Trainer(tiny_config(data, run_dir, **options), CPU)
    try:
        trainer.fit()
    finally:
        trainer.close()


@pytest.mark.parametrize("arch,options", [("GPT2LMHeadModel", GPT2), ("LlamaForCausalLM", LLAMA)])
def test_export_round_trip_through_transformers(arch, options, prose_bytes, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    run, out = tmp_path / "run", tmp_path / "hf"
    train(prose_bytes, run, **options)
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= \
        {p.name for p in out.iterdir()}

    hf, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert type(hf).__name__ == arch
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    text = "ROMEO:\nBut soft, what light through yonder window breaks?"
    ids = AutoTokenizer.from_pretrained(str(out))(text)["input_ids"]
    assert ids == open_data(prose_bytes).tokenizer.encode(text)
    ours = load_model(run)
    batch = torch.tensor([ids[:32], ids[-32:]])
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(batch).logits, ours(batch), atol=1e-4, rtol=0)
    assert torch.equal(ours.tok_emb.weight, hf.get_input_embeddings().weight)  # exported as stored


def test_export_refuses_what_no_hf_class_computes(prose_bytes, tmp_path, capsys):
    with pytest.raises(ConfigError, match="model.qk_norm=False"):
        hf_architecture(ModelConfig(vocab_size=97, **{k.split("__")[1]: v for k, v in LLAMA.items()},
                                    qk_norm=True))
    run, out = tmp_path / "run", tmp_path / "hf"
    train(prose_bytes, run, model__pos="rope", schedule__max_steps=1)  # gpt2-like with rope
    assert main(["export", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "GPT2LMHeadModel, needs model.pos='learned'" in err and "\n" not in err
    assert not out.exists()
    # a non-empty --out is never written into
    train(prose_bytes, tmp_path / "ok", schedule__max_steps=1)
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["export", str(tmp_path / "ok"), "--out", str(out)]) == 2
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
