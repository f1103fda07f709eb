"""The initial weights each backend builds, for tests/test_init.py to compare bitwise.

    torchrun --nproc-per-node 2 tests/init_worker.py OUT SPEC [SPEC ...]
    python tests/init_worker.py OUT SPEC [SPEC ...]       # one process (a group of one)

For each backend spec (``none``, ``fsdp``, ``deepspeed<stage>``) and each model style in
:data:`STYLES`, it builds the model the way the trainer does (on ``meta``, then
``build_backend``) and rank 0 writes ``backend.full_parameters()`` to
``OUT/<spec>-<style>.pt``; every rank checks that it gathered the same tensors. The
shapes are odd on purpose (vocabulary 97, 17 positions): FSDP2's last
shards are shorter than the others, padded inside FSDP.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from bigtrain.config import load_config
from bigtrain.model.gpt import GPT
from bigtrain.parallel.backend import build_backend
from bigtrain.parallel.env import fail_fast, init_distributed, shutdown

SEED = 11
COMMON = ["model.n_layer=2", "model.n_head=3", "model.seq_len=17", "model.vocab_size=97",
          "batch.global_size=4", "batch.micro_size=2", "parallel.precision=fp32", "parallel.device=cpu",
          f"seed={SEED}"]
STYLES = {  # GPT-2 (learned positions, layernorm with biases, tied head) and LLaMA (rope, rmsnorm, qk-norm)
    "gpt2": ["model.d_model=42", "model.norm=layernorm", "model.mlp=gelu", "model.pos=learned", "model.bias=true",
             "model.tie_embeddings=true"],
    "llama": ["model.d_model=36", "model.norm=rmsnorm", "model.mlp=swiglu", "model.pos=rope", "model.bias=false",
              "model.tie_embeddings=false", "model.qk_norm=true"],
}


def config(spec: str, style: str):
    parallel = ([f"parallel.backend=deepspeed", f"parallel.zero_stage={spec[len('deepspeed'):]}"]
                if spec.startswith("deepspeed") else [f"parallel.backend={spec}"])
    return load_config(overrides=COMMON + STYLES[style] + parallel)


def main() -> None:
    out, specs = Path(sys.argv[1]), sys.argv[2:]
    env = init_distributed("cpu", group=True)
    with fail_fast(env):
        for spec in specs:
            for style in STYLES:
                cfg = config(spec, style)
                with torch.device("meta"):
                    model = GPT(cfg.model)
                params = build_backend(model, cfg, env).full_parameters()
                gathered = [None] * env.world
                torch.distributed.all_gather_object(gathered, params)
                assert all(p.keys() == params.keys() and all(torch.equal(p[k], params[k]) for k in p)
                           for p in gathered), f"{spec} {style}: ranks gathered different parameters"
                if env.is_main:
                    torch.save(params, out / f"{spec}-{style}.pt")
    shutdown()


if __name__ == "__main__":
    main()
