"""The clip and the AdamW step inside a training loop: bigtrain's against the usual ones.

    python bench/optimizer.py [--sizes tiny,25M] [--steps 80] [--warm 20]

Prints one JSON object: per size, the main thread's CPU milliseconds per step of the
"clip and step" phase (gradient norm, clip, AdamW, gradients dropped), median over the timed
steps, for

* ``bigtrain``: :meth:`Backend.grad_norm` and :meth:`Backend.update` (fused AdamW, the clip
  inside its kernel as ``grad_scale``, the step's skip decided on the device);
* ``fused``: ``clip_grad_norm_`` then torch's fused AdamW;
* ``foreach``: ``clip_grad_norm_`` then AdamW with ``foreach=True``;
* ``default``: ``clip_grad_norm_`` then ``torch.optim.AdamW`` as nanoGPT builds it off CUDA
  (torch's default there: a loop over the parameters).

Each variant trains its own copy of the same model on the same batches; their steps are taken
in turn, so a drift in this machine's speed falls on all of them alike. The phase is timed
right after the backward, as in a real step, with the caches holding what the backward left.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bigtrain.model.gpt import GPT, lm_loss
from bigtrain.optim import build_optimizer
from bigtrain.parallel.base import Backend
from overhead import CPU, size_config, torch_adamw


def variants(cfg, model: GPT) -> dict:
    """Each variant's (model, clip-and-step function)."""
    out, clip = {}, cfg.optim.grad_clip
    backend = Backend(copy.deepcopy(model), cfg, CPU)
    backend.optimizer = build_optimizer(backend.model, cfg)

    def bigtrain_step():
        backend._norm = backend.grad_norm()
        backend.update(cfg.optim.lr, clip, apply=torch.ones((), dtype=torch.bool))
    out["bigtrain"] = (backend.model, bigtrain_step)
    for name, kwargs in (("fused", {"fused": True}), ("foreach", {"foreach": True}), ("default", {})):
        m = copy.deepcopy(model)
        opt = torch_adamw(m, cfg, **kwargs)

        def step(m=m, opt=opt):
            torch.nn.utils.clip_grad_norm_(m.parameters(), clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        out[name] = (m, step)
    return out


def measure(name: str, tmp: Path, steps: int, warm: int) -> dict:
    cfg, (data, train, _) = size_config(name, tmp, steps)
    torch.manual_seed(cfg.seed)
    runs = variants(cfg, GPT(cfg.model))
    seq, rows = cfg.model.seq_len, cfg.batch.global_size
    bf16 = cfg.parallel.precision == "bf16"
    times = {k: [] for k in runs}
    for it in range(warm + steps):
        x = torch.from_numpy(train.batch(range(it * rows, (it + 1) * rows), seq))
        for kind, (model, clip_and_step) in runs.items():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = model(x[:, :-1])
            (lm_loss(logits, x[:, 1:])[0] / x[:, 1:].numel()).backward()
            t0 = time.thread_time()
            clip_and_step()
            times[kind].append(time.thread_time() - t0)
    med = {k: round(statistics.median(v[warm:]) * 1e3, 3) for k, v in times.items()}
    return {"params_M": round(sum(p.numel() for p in runs["bigtrain"][0].parameters()) / 1e6, 2),
            "precision": cfg.parallel.precision, "steps": steps, "cpu_ms_per_step": med,
            "vs_bigtrain": {k: round(v / med["bigtrain"], 3) for k, v in med.items()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="tiny,25M")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--warm", type=int, default=20)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bigtrain-optimizer-"))
    out = {"threads": torch.get_num_threads(), "sizes": {}}
    for name in args.sizes.split(","):
        out["sizes"][name] = measure(name, tmp, args.steps, args.warm)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
