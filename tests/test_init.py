"""Sharded initialisation: every layout starts from bitwise the one-process weights.

The model is built on ``meta`` and each rank writes only its own part of each
parameter (bigtrain/model/init.py). The end-to-end check launches real processes
(tests/init_worker.py: FSDP2 and DeepSpeed ZeRO-2/3 on 2 ranks, gloo) and compares
their gathered parameters with the single-process build, bit for bit.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bigtrain.config import ConfigError, ModelConfig
from bigtrain.model.gpt import GPT
from bigtrain.model.init import materialize, param_seed, seeded
from bigtrain.parallel.backend import build_backend
from bigtrain.parallel.env import DistEnv
from helpers import REPO, free_port, rank_env
from init_worker import SEED, STYLES, config

WORKER = str(Path(__file__).resolve().parent / "init_worker.py")
CPU = DistEnv(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
SPECS = ["fsdp", "deepspeed3", "deepspeed2"]  # ZeRO-3 first: its init must not rely on an earlier engine


def tiny(**kw) -> ModelConfig:
    return ModelConfig(**{"n_layer": 2, "n_head": 2, "d_model": 32, "seq_len": 16, "vocab_size": 61, **kw})


def one_process(cfg) -> dict[str, torch.Tensor]:
    """What a one-process run starts from: built on meta, materialised by the ``none`` backend."""
    with torch.device("meta"):
        model = GPT(cfg.model)
    return build_backend(model, cfg, CPU).full_parameters()


@pytest.mark.slow  # real processes (torchrun)
def test_sharded_builds_equal_the_one_process_build_bitwise(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), WORKER, str(tmp_path), *SPECS]
    done = subprocess.run(cmd, cwd=REPO, env={**rank_env(), "DS_ACCELERATOR": "cpu"}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for style in STYLES:
        ref = one_process(config("none", style))
        for spec in SPECS:
            got = torch.load(tmp_path / f"{spec}-{style}.pt")
            assert got.keys() == ref.keys(), f"{spec} {style}"  # the tied head stays tied
            different = [name for name in ref if not torch.equal(got[name], ref[name])]
            assert not different, f"{spec} {style}: {different}"


def test_the_eager_model_is_the_run_s_initial_model():
    """``torch.manual_seed(s); GPT(cfg)`` (tools, preflight, tests) equals what a run with
    ``seed: s`` starts from."""
    for style in STYLES:
        cfg = config("none", style)
        torch.manual_seed(SEED)
        eager = dict(GPT(cfg.model).named_parameters())
        ref = one_process(cfg)
        assert eager.keys() == ref.keys() and all(torch.equal(eager[n], ref[n]) for n in ref)


def test_a_parameter_s_values_depend_only_on_the_seed_and_its_name():
    """Adding layers or changing other parameters' shapes leaves a parameter's draw alone,
    and a different seed or name draws different values."""
    small, deep = GPT(tiny(), init=False), GPT(tiny(n_layer=4, vocab_size=200), init=False)
    name = "blocks.1.attn.q.weight"
    draw = seeded(small, 3)(name, small.get_parameter(name))
    assert torch.equal(draw, seeded(deep, 3)(name, deep.get_parameter(name)))
    assert not torch.equal(draw, seeded(small, 4)(name, small.get_parameter(name)))
    assert not torch.equal(draw[:32], seeded(small, 3)("blocks.0.attn.q.weight", small.blocks[0].attn.q.weight)[:32])
    assert param_seed(3, name) != param_seed(3, "blocks.0.attn.q.weight")


def test_materialize_takes_any_source_by_parameter_name():
    """Another source (e.g. a Hugging Face checkpoint) fills the model by name; the RoPE tables
    are recomputed and the tied head shares the token table again after ``to_empty``."""
    cfg = tiny(pos="rope", norm="rmsnorm", tie_embeddings=True)
    with torch.device("meta"):
        model = GPT(cfg)

    def source(name, param):
        return torch.full(param.shape, float(len(name)))

    materialize(model, source, "cpu")
    for name, p in model.named_parameters():
        assert torch.equal(p, torch.full(p.shape, float(len(name)))), name
    assert model.lm_head.weight is model.tok_emb.weight
    reference = GPT(cfg)
    assert torch.equal(model.rope_cos, reference.rope_cos) and torch.equal(model.rope_sin, reference.rope_sin)


def test_a_source_with_the_wrong_shape_is_one_config_error():
    with torch.device("meta"):
        model = GPT(tiny())
    with pytest.raises(ConfigError, match=r"^initial weights: tok_emb.weight has shape \(60, 32\), "
                                          r"the model needs \(61, 32\)$"):
        materialize(model, lambda name, p: torch.zeros(60, 32) if name == "tok_emb.weight" else torch.zeros(p.shape),
                    "cpu")
