"""`bigtrain plan`: its parameter arithmetic equals the real model's, its estimates move the
way they must, and its suggestion fits where the configured layout does not."""
import json

import pytest
import torch

from bigtrain.cli import main
from helpers import REPO
from bigtrain.config import load_config
from bigtrain.model.gpt import GPT
from bigtrain.plan import estimate, param_counts, plan

STYLES = {
    "gpt2": [],
    "llama": ["model.norm=rmsnorm", "model.mlp=swiglu", "model.pos=rope", "model.bias=false",
              "model.tie_embeddings=false"],
    "llama-qk": ["model.norm=rmsnorm", "model.mlp=swiglu", "model.pos=rope", "model.bias=false", "model.qk_norm=true"],
    "odd-ffn": ["model.d_ff=200", "model.bias=false"],
}


@pytest.mark.parametrize("style", sorted(STYLES))
def test_parameter_counts_equal_the_built_model(style):
    cfg = load_config(overrides=["model.n_layer=3", "model.d_model=64", "model.n_head=4", "model.vocab_size=300",
                                 *STYLES[style]])
    with torch.device("meta"):
        model = GPT(cfg.model)
    counts = param_counts(cfg)
    assert counts["total"] == model.num_params()
    assert counts["block"] == sum(p.numel() for p in model.blocks[0].parameters())


def test_more_gpus_shard_the_state_and_shorten_the_run():
    cfg = load_config(overrides=["model.preset=gpt2-350m", "parallel.backend=fsdp"])
    eight, sixteen = estimate(cfg, 8, "H100", 0.4), estimate(cfg, 16, "H100", 0.4)
    assert sixteen.state_gib["optimizer"] == pytest.approx(eight.state_gib["optimizer"] / 2, rel=0.01)
    assert sixteen.days == pytest.approx(eight.days / 2, rel=0.01)
    assert estimate(cfg, 8, "H100 PCIe", 0.4).tokens_per_s < eight.tokens_per_s  # a slower part


def test_checkpointing_trades_activations_for_compute():
    cfg = load_config(overrides=["model.preset=llama-1b", "parallel.backend=fsdp", "model.seq_len=2048"])
    none, op, full = (estimate(cfg, 8, "H100", 0.4, 8, policy).activations_gib for policy in ("none", "op", "full"))
    assert full < op < none


def test_the_suggestion_fits_where_the_configured_layout_does_not(tmp_path):
    overrides = ["model.preset=llama-1b", "model.seq_len=4096", "parallel.backend=fsdp", "batch.global_size=256",
                 "batch.micro_size=32", "parallel.activation_checkpointing=none"]
    result = plan(load_config(overrides=overrides), 8, "A100-40GB", 0.4)
    assert not result["current"]["fits"]
    best = result["suggestion"]
    assert best["fits"] and best["total_gib"] <= 0.9 * 40
    assert "suggestion: batch.micro_size=" in result["text"]


def test_cli_text_json_and_bad_input(capsys):
    assert main(["plan", str(REPO / "configs/gpt2-124m.yaml"), "--gpus", "8", "--gpu", "H100", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["current"]["gpus"] == 8 and out["current"]["params"] > 100e6
    assert main(["plan", str(REPO / "configs/gpt2-124m.yaml"), "--gpu", "TPU"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown GPU 'TPU'" in err[0]
    assert main(["plan", str(REPO / "configs/gpt2-124m.yaml"), "--gpus", "0"]) == 2
