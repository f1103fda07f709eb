"""Tokens/s and MFU of a ~30M-parameter GPT at seq 256 on this machine, fp32 and bf16,
through bigtrain's trainer and through a bare minimal PyTorch loop on the same model.

    python bench/throughput.py [--steps 8] [--data DIR]

Prints one JSON object. The bare loop is the floor on overhead: same model, same
AdamW, autocast and clipping, random tokens already in memory. The matmul peak
is the one MFU uses (bigtrain/peak.py).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from bigtrain.config import load_config
from bigtrain.peak import peak_flops
from bigtrain.model.gpt import GPT, lm_loss
from bigtrain.parallel.env import DistEnv
from bigtrain.trainer import Trainer
from common import prepared_data

MODEL = ["model.n_layer=8", "model.n_head=8", "model.d_model=512", "model.seq_len=256",
         "batch.global_size=8", "batch.micro_size=8", "logging.tensorboard=false", "logging.progress=off",
         "eval.batches=0", "checkpoint.every=0", "checkpoint.resume=never", "stability.enabled=false"]


def bare_loop(cfg, steps: int) -> float:
    torch.manual_seed(0)
    model = GPT(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    x = torch.randint(0, cfg.model.vocab_size, (cfg.batch.global_size, cfg.model.seq_len + 1))
    bf16 = cfg.parallel.precision == "bf16"

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x[:, :-1])
        ce, _ = lm_loss(logits, x[:, 1:])
        (ce / x[:, 1:].numel()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timed(step, steps)


def timed(step, steps: int) -> float:
    step(), step()  # warm-up: allocator, kernels, AdamW state
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps


def bigtrain_loop(cfg, steps: int) -> float:
    trainer = Trainer(cfg, DistEnv(0, 1, 0, torch.device("cpu")))
    position = [0]

    def step():
        batch = trainer.loader.get(position[0], cfg.batch.global_size)
        trainer.train_step(batch)
        position[0] = batch.next_position

    try:
        return timed(step, steps)
    finally:
        trainer.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--data", default=None, help="a prepared data dir (default: tiny Shakespeare, bytes)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bigtrain-bench-"))
    data = prepared_data(args.data, tmp)
    out = {"threads": torch.get_num_threads(), "steps": args.steps}
    for precision in ("fp32", "bf16"):
        cfg = load_config(overrides=MODEL + [f"data.path={data}", f"run_dir={tmp / precision}",
                                             f"parallel.precision={precision}"])
        model = GPT(cfg.model)
        tokens = cfg.batch.global_size * cfg.model.seq_len
        peak = peak_flops(torch.device("cpu"), precision).flops
        bare, ours = bare_loop(cfg, args.steps), bigtrain_loop(cfg, args.steps)
        out[precision] = {
            "params_M": round(model.num_params() / 1e6, 2),
            "peak_matmul_gflops": round(peak / 1e9, 1),
            "bare_tokens_per_s": round(tokens / bare, 1),
            "bigtrain_tokens_per_s": round(tokens / ours, 1),
            "bare_mfu": round(model.flops_per_token() * tokens / bare / peak, 4),
            "bigtrain_mfu": round(model.flops_per_token() * tokens / ours / peak, 4),
            "bigtrain_vs_bare": round(bare / ours, 4),
        }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
