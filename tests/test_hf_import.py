"""model.init_from: continued pretraining from Hugging Face weights, for GPT-2 and LLaMA.

Every HF model here is a small random one that the test saves with ``save_pretrained``
(nothing is downloaded), with a byte-level tokenizer in the same directory, so that
``bigtrain prepare --tokenizer DIR`` reads the model's own tokenizer.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bigtrain.checkpoint import load_model
from bigtrain.cli import main
from bigtrain.config import ConfigError, load_config
from bigtrain.data.tokenizer import BytesTokenizer
from bigtrain.parallel.env import DistEnv
from bigtrain.trainer import Trainer
from helpers import rank_env, read_jsonl, tiny_overrides, torchrun

CPU = DistEnv(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
EOT = BytesTokenizer.eot_id
ARCHS = ["GPT2LMHeadModel", "LlamaForCausalLM"]


def save_random(arch: str, directory: Path, **options) -> Path:
    """A random ``arch`` with every weight drawn away from its init (norm gains of 1 and zero
    biases would hide a swapped or dropped tensor), saved with its tokenizer."""
    import transformers
    special = dict(vocab_size=BytesTokenizer.vocab_size, bos_token_id=EOT, eos_token_id=EOT)
    if arch == "GPT2LMHeadModel":
        config = transformers.GPT2Config(n_positions=32, n_embd=64, n_layer=2, n_head=2, **special, **options)
    else:
        options = {"num_key_value_heads": 2, "rope_parameters": {"rope_type": "default", "rope_theta": 500.0},
                   **options}
        config = transformers.LlamaConfig(
            hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False, **special, **options)
    config.architectures = [arch]
    torch.manual_seed(0)
    model = getattr(transformers, arch)(config)
    with torch.no_grad():
        for name, p in model.named_parameters():  # norm gains near 1, biases near 0, matrices small
            p.normal_(1.0 if p.dim() == 1 and name.endswith("weight") else 0.0, 0.1 if p.dim() == 1 else 0.05)
    model.save_pretrained(directory)
    BytesTokenizer().save_hf(directory)
    return directory


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {arch: save_random(arch, root / arch) for arch in ARCHS}


@pytest.fixture(scope="module")
def hf_data(hf_dirs, docs_file, tmp_path_factory) -> str:
    """The docs corpus prepared with the GPT-2 directory's tokenizer (`prepare --tokenizer DIR`)."""
    out = tmp_path_factory.mktemp("data") / "docs_hf"
    assert main(["prepare", "--source", docs_file, "--tokenizer", str(hf_dirs["GPT2LMHeadModel"]),
                 "--out", str(out), "--val-fraction", "0.01"]) == 0
    return str(out)


def overrides(data: str, run: Path, hf: Path, *model: str, **extra) -> list[str]:
    """The tiny run's settings without its model keys (the weights decide those), then ``model``'s."""
    base = [o for o in tiny_overrides(data, run, **extra) if not o.startswith("model.")]
    return base + [f"model.init_from={hf}", *model]


def config_file(tmp_path: Path) -> str:
    """A config file that leaves everything to the overrides (the command line needs one)."""
    (tmp_path / "empty.yaml").write_text("seed: 7\n")
    return str(tmp_path / "empty.yaml")


def train(tmp_path: Path, args: list[str]) -> int:
    return main(["train", config_file(tmp_path), *args])


def hf_model(directory: Path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(directory)).eval()


def first_batch(trainer: Trainer) -> torch.Tensor:
    """The run's first global batch, [batch, seq_len + 1], from its sample order."""
    order, size = trainer.order, trainer.cfg.batch.global_size
    samples = order.sample_at(order.next_batch(0, size)[0])
    return torch.from_numpy(trainer.train_split.batch(samples, trainer.cfg.model.seq_len))


def hf_loss(directory: Path, rows: torch.Tensor) -> float:
    with torch.no_grad():
        logits = hf_model(directory)(rows[:, :-1]).logits
    return F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten()).item()


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_weights_round_trip_bitwise_and_compute_what_transformers_computes(arch, hf_dirs, hf_data, tmp_path):
    from safetensors.torch import load_file
    hf, run, out = hf_dirs[arch], tmp_path / "run", tmp_path / "export"
    cfg = load_config(overrides=overrides(hf_data, run, hf, "model.seq_len=32", schedule__max_steps=1))
    if arch == "LlamaForCausalLM":  # rope: trains on 32 of the 64 positions the weights support
        assert (cfg.model.seq_len, cfg.model.n_head, cfg.model.rope_theta) == (32, 4, 500.0)
    trainer = Trainer(cfg, CPU)
    try:
        trainer.checkpointer.save(0, trainer.parts())  # the weights as imported, before any update
        trainer.checkpointer.wait()
        rows = first_batch(trainer)
        trainer.fit()
    finally:
        trainer.close()

    assert main(["export", str(run), "--step", "0", "--out", str(out)]) == 0
    original, exported = load_file(hf / "model.safetensors"), load_file(out / "model.safetensors")
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[k], original[k]) for k in original)

    ids = torch.randint(0, BytesTokenizer.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(load_model(run, 0)(ids), hf_model(hf)(ids).logits, atol=1e-5, rtol=0)
    # the first step trains from the HF weights: its loss is the HF model's on that batch
    first = read_jsonl(run / "metrics.jsonl")[0]
    assert first["step"] == 1 and first["loss"] == pytest.approx(hf_loss(hf, rows), abs=1e-5)


def test_the_weights_decide_the_architecture(hf_dirs, hf_data, tmp_path, capsys):
    llama = hf_dirs["LlamaForCausalLM"]
    args = overrides(hf_data, tmp_path / "run", llama)
    with pytest.raises(ConfigError, match="n_head=4, d_model=64 but the config says model.n_head=2, model.d_model=12"):
        load_config(overrides=args + ["model.n_head=2", "model.d_model=128"])
    with pytest.raises(ConfigError, match="seq_len=64 but the config says model.seq_len=128"):
        load_config(overrides=args + ["model.seq_len=128"])  # longer than max_position_embeddings
    assert train(tmp_path, [*args, "model.norm=layernorm"]) == 2
    err = capsys.readouterr().err.strip()
    assert "LlamaForCausalLM with norm='rmsnorm'" in err and "\n" not in err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("options,message", [
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}), "rope scaling 'linear'"),
    (dict(attention_bias=True), "attention_bias=True"),
])
def test_unsupported_hf_options_are_one_line(options, message, hf_data, tmp_path, capsys):
    hf = save_random("LlamaForCausalLM", tmp_path / "hf", **options)
    capsys.readouterr()  # save_pretrained's progress bar
    assert train(tmp_path, overrides(hf_data, tmp_path / "run", hf)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_unsupported_architecture_and_foreign_data_are_one_line(hf_dirs, hf_data, prose_char, tmp_path, capsys):
    import transformers
    other = tmp_path / "mistral"
    transformers.MistralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                               num_key_value_heads=4, architectures=["MistralForCausalLM"]).save_pretrained(other)
    capsys.readouterr()
    assert train(tmp_path, overrides(hf_data, tmp_path / "a", other)) == 2
    assert "MistralForCausalLM is not supported" in capsys.readouterr().err
    # data prepared with another tokenizer (char: 76 tokens) than the weights' (257)
    assert train(tmp_path, overrides(prose_char, tmp_path / "b", hf_dirs["GPT2LMHeadModel"])) == 2
    err = capsys.readouterr().err.strip()
    assert "has a vocabulary of 257 tokens" in err and "--tokenizer" in err and "\n" not in err


@pytest.mark.slow  # two torchrun launches
@pytest.mark.parametrize("backend", ["fsdp", "deepspeed"])
def test_training_from_hf_weights_on_two_ranks(backend, hf_dirs, hf_data, tmp_path):
    hf, run = hf_dirs["LlamaForCausalLM"], tmp_path / "run"
    args = overrides(hf_data, run, hf, schedule__max_steps=3, parallel__backend=backend, parallel__zero_stage=3)
    proc = torchrun(2, ["train", config_file(tmp_path), *args], env={**rank_env(), "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    trainer = Trainer(load_config(overrides=overrides(hf_data, tmp_path / "one", hf)), CPU)
    try:
        rows = first_batch(trainer)
    finally:
        trainer.close()
    losses = [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 3 and losses[0] == pytest.approx(hf_loss(hf, rows), abs=1e-5)


def test_weights_that_do_not_fit_their_config_are_one_line(hf_dirs, hf_data, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file
    hf = tmp_path / "hf"
    shutil.copytree(hf_dirs["GPT2LMHeadModel"], hf)
    tensors = load_file(hf / "model.safetensors")
    del tensors["transformer.h.1.mlp.c_fc.bias"]
    save_file(tensors, str(hf / "model.safetensors"), metadata={"format": "pt"})
    assert train(tmp_path, overrides(hf_data, tmp_path / "a", hf)) == 2
    err = capsys.readouterr().err.strip()
    assert "the weights have no tensor 'transformer.h.1.mlp.c_fc.bias'" in err and "\n" not in err
    assert not (tmp_path / "a").exists()  # refused before the run wrote anything
    tensors["transformer.h.1.mlp.c_fc.bias"] = tensors["transformer.h.0.mlp.c_fc.bias"][:7].clone()  # wrong shape
    save_file(tensors, str(hf / "model.safetensors"), metadata={"format": "pt"})
    assert train(tmp_path, overrides(hf_data, tmp_path / "b", hf)) == 2
    assert "initial weights: blocks.1.mlp.fc.bias has shape (7,), the model needs (256,)" in capsys.readouterr().err
