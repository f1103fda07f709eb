"""`bigtrain plan`: its parameter arithmetic equals the real model's, its estimates move the
way they must, and its suggestion fits where the configured layout does not."""
import json
import subprocess
import sys

import pytest
import torch

from bigtrain.cli import main
from helpers import REPO, rank_env
from bigtrain.config import load_config
from bigtrain.model.gpt import GPT
from bigtrain.plan import estimate, param_counts, plan, state_bytes

STYLES = {
    "gpt2": [],
    "llama": ["model.norm=rmsnorm", "model.mlp=swiglu", "model.pos=rope", "model.bias=false",
              "model.tie_embeddings=false"],
    "llama-qk": ["model.norm=rmsnorm", "model.mlp=swiglu", "model.pos=rope", "model.bias=false", "model.qk_norm=true"],
    "odd-ffn": ["model.d_ff=200", "model.bias=false"],
    "llama-gqa": ["model.norm=rmsnorm", "model.mlp=swiglu", "model.pos=rope", "model.bias=false",
                  "model.tie_embeddings=false", "model.n_kv_head=2", "model.qk_norm=true"],
    "gpt2-gqa": ["model.n_kv_head=1"],
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
    assert "suggestion: parallel.tp=1 batch.micro_size=" in result["text"]


def test_cli_text_json_and_bad_input(capsys):
    assert main(["plan", str(REPO / "configs/gpt2-124m.yaml"), "--gpus", "8", "--gpu", "H100", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["current"]["gpus"] == 8 and out["current"]["params"] > 100e6
    assert main(["plan", str(REPO / "configs/gpt2-124m.yaml"), "--gpu", "TPU"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown GPU 'TPU'" in err[0]
    assert main(["plan", str(REPO / "configs/gpt2-124m.yaml"), "--gpus", "0"]) == 2


def _meta_model(cfg):
    with torch.device("meta"):
        return GPT(cfg.model)


def test_llama_3_8b_on_64_h100_holds_16_bytes_per_parameter_over_dp():
    """FSDP with fp32 master weights: fp32 parameters, fp32 gradients and two fp32 AdamW moments,
    each sharded over the 64 data-parallel ranks (tp 1)."""
    cfg = load_config(REPO / "configs/llama-3-8b.yaml")
    n = _meta_model(cfg).num_params()
    est = estimate(cfg, 64, "H100", 0.4)
    assert (est.tp, est.dp) == (1, 64)
    state = sum(est.state_gib[k] for k in ("params", "grads", "optimizer")) * 2**30
    assert state == pytest.approx(16 * n / 64, rel=0.05)


# Megatron's split, written out from the parameter names (bigtrain/parallel/tp.py): these are
# divided over the tp ranks; every other parameter (norms, positions, row-parallel biases) is whole.
TP_SHARDED = ("attn.q.", "attn.k.", "attn.v.", "attn.proj.weight", "mlp.fc.", "mlp.gate.", "mlp.up.",
              "mlp.proj.weight", "tok_emb.", "lm_head.")


@pytest.mark.parametrize("config", ["llama-70b.yaml", "gpt2-1.5b.yaml"])
def test_tensor_parallel_state_divides_the_sharded_parameters(config):
    cfg = load_config(REPO / "configs" / config, overrides=["model.n_layer=2"])
    sharded = whole = 0
    for name, p in _meta_model(cfg).named_parameters():  # a tied head is listed once
        if any(key in name for key in TP_SHARDED):
            sharded += p.numel()
        else:
            whole += p.numel()
    assert whole > 0 and sharded > 50 * whole
    for tp, dp in [(1, 8), (2, 4), (8, 1)]:
        state = state_bytes(cfg, dp, tp)
        assert state["params"] + state["grads"] + state["optimizer"] == pytest.approx(16 * (sharded / tp + whole) / dp)
    one, two = state_bytes(cfg, 8, 1), state_bytes(cfg, 8, 2)
    assert two["optimizer"] == pytest.approx(one["optimizer"] / 2, rel=0.02)  # ~half: whole is < 2%


def test_the_fsdp_step_peak_is_what_two_real_ranks_allocate_with_the_table_gathered_or_sharded():
    """The plan's per-rank peak of a step (state, activations, in flight) against the tensors two
    real FSDP ranks hold at once during a bf16 step (bench/memory.py: the profiler's allocation
    events on top of what lived before). A model whose token table outweighs its blocks, so that
    FSDP's gathered root (the table, its gradient and reduce copy: about 8 bytes a parameter)
    dominates the step when the table is gathered, and the exchange when it is used on its shards."""
    r = subprocess.run([sys.executable, str(REPO / "bench" / "memory.py"), "--sizes", "wide-vocab", "--seq-len", "32",
                        "--runs", "fsdp-table-gathered,fsdp-table-sharded"],
                       cwd=REPO, env=rank_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = json.loads(r.stdout)["runs"]
    gathered, sharded = runs["wide-vocab/fsdp-table-gathered/world2"], runs["wide-vocab/fsdp-table-sharded/world2"]
    assert gathered["peak_gib"] > 1.2 * sharded["peak_gib"]  # the gathered table is what the layouts differ by
    for run in (gathered, sharded):
        assert abs(run["peak_error"]) < 0.2, run


def test_one_process_peak_counts_autocasts_copies_of_the_weights():
    """Without sharding, bf16 autocast casts every matmul's fp32 weight and autograd keeps the
    copy for the backward (2 bytes a parameter, 9% of this model's peak): the plan's peak against
    the allocations of a real step (deterministic: the same allocations every run)."""
    r = subprocess.run([sys.executable, str(REPO / "bench" / "memory.py"), "--sizes", "small", "--runs", "none"],
                       cwd=REPO, env=rank_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    run = json.loads(r.stdout)["runs"]["small/none/world1"]
    assert abs(run["peak_error"]) < 0.04, run


@pytest.mark.parametrize("config, gpus, tp", [("llama-70b.yaml", 64, "more"), ("gpt2-1.5b.yaml", 8, 1),
                                              ("gpt2-1.5b.yaml", 64, 1), ("llama-3-8b.yaml", 64, 1)])
def test_the_suggestion_uses_tensor_parallelism_only_where_memory_needs_it(config, gpus, tp):
    result = plan(load_config(REPO / "configs" / config), gpus, "H100", 0.4)
    best = result["suggestion"]
    assert best["fits"] and best["total_gib"] <= 0.9 * 80
    assert best["tp"] > 1 and best["loss_parallel"] if tp == "more" else best["tp"] == tp
    assert best["tp"] * best["dp"] == gpus


def test_70b_does_not_fit_on_8_h100s_and_the_plan_says_how_many_it_needs():
    cfg = load_config(REPO / "configs/llama-70b.yaml")
    result = plan(cfg, 8, "H100", 0.4)
    assert result["suggestion"] is None and not result["current"]["fits"]
    state = result["current"]["state_gib"]
    assert state["params"] + state["grads"] + state["optimizer"] > 80  # the state alone
    assert "nothing fits on 8 x H100" in result["text"]
    needs = result["needs_gpus"]
    assert needs > 8 and plan(cfg, needs, "H100", 0.4)["suggestion"]["fits"]
    assert plan(cfg, needs // 2, "H100", 0.4)["suggestion"] is None


@pytest.mark.parametrize("args, needle", [
    (["--gpus", "12"], "--gpus 12 is not a multiple of parallel.tp=8"),
    (["--gpus", "64", "model.n_kv_head=4"], "parallel.tp=8 does not divide model.n_kv_head=4"),
])
def test_a_layout_tensor_parallelism_cannot_split_is_one_line(args, needle, capsys):
    assert main(["plan", str(REPO / "configs/llama-70b.yaml"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]
