"""What ``torch.compile`` buys on this machine: per-block model compile and a compiled optimizer step.

    python bench/compile.py [--sizes tiny,25M,124M] [--rounds 6] [--steps tiny=20,25M=3,124M=2] [--device cpu]

Prints one JSON object. The sizes are ``bench/overhead.py``'s. Why this is its own bench, in one
process and interleaved: compile's gain on a CPU is a few percent at most, and this machine's
speed drifts by more than that between runs minutes apart (the same eager loop: 44 -> 52 ms a
step); eager and compiled steps taken in alternating rounds of ``--steps`` see the same drift.

* ``model``: bigtrain's step (:class:`bigtrain.parallel.base.Backend` ``measure`` + ``update``,
  fused AdamW) with ``parallel.compile=false`` against ``true`` (the backend compiles each block
  in :func:`bigtrain.parallel.base.prepare_blocks`); the same weights, the same batch.
* ``optimizer``: the optimizer step alone on the model's parameters with fixed gradients:
  bigtrain's fused AdamW against the plain (for-loop) AdamW under ``torch.compile``, which is
  torch's recipe for a compiled optimizer (inductor fuses the update into its own kernels).

Each reports the medians of the rounds' per-step times (``ms``: wall; ``cpu_ms``: this thread's
CPU time, which other processes on the machine disturb less), ``compiled_vs_default`` (the
compiled variant's wall time over bigtrain's default, eager blocks or fused AdamW; < 1: compile is
faster), ``compile_s`` (the compiled variant's first two steps, cold: inductor's cache is a fresh
directory per run) and ``break_even_steps``: the steps after which the compile has paid for
itself (null where compiled steps are not faster).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="bigtrain-inductor-"))  # cold compiles

import torch  # noqa: E402

from bigtrain.data.loader import Batch  # noqa: E402
from bigtrain.host_memory import keep_freed_host_memory  # noqa: E402
from bigtrain.model.gpt import GPT  # noqa: E402
from bigtrain.parallel.backend import LocalBackend  # noqa: E402
from bigtrain.parallel.env import DistEnv  # noqa: E402
from overhead import size_config  # noqa: E402


def interleaved(variants: dict, rounds: int, steps: int) -> dict:
    """Each variant's step (a callable) ``steps`` times per round, the variants alternating
    which goes first; medians of the rounds' wall and CPU milliseconds per step."""
    wall, cpu = ({k: [] for k in variants} for _ in range(2))
    names = list(variants)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            t, c = time.perf_counter(), time.thread_time()
            for _ in range(steps):
                variants[name]()
            wall[name].append((time.perf_counter() - t) / steps * 1e3)
            cpu[name].append((time.thread_time() - c) / steps * 1e3)
    return {"ms": {k: round(statistics.median(v), 2) for k, v in wall.items()},
            "cpu_ms": {k: round(statistics.median(v), 2) for k, v in cpu.items()},
            "all_ms": {k: [round(x, 1) for x in v] for k, v in wall.items()}}


def first_two(step) -> float:
    """Seconds for a variant's first two steps (the compile: forward, then backward)."""
    t = time.perf_counter()
    step()
    step()
    return time.perf_counter() - t


def summary(result: dict, compile_s: float, default: str, compiled: str) -> dict:
    e, c = result["ms"][default], result["ms"][compiled]
    saving = (e - c) / 1e3
    return {**result, "compiled_vs_default": round(c / e, 4), "compile_s": round(compile_s, 1),
            "break_even_steps": round(compile_s / saving) if saving > 0 else None}


def measure_model(name: str, device: torch.device, tmp: Path, rounds: int, steps: int) -> dict:
    cfg, (_, train, _) = size_config(name, tmp, 10)
    env = DistEnv(0, 1, 0, device)
    backends = {}
    for kind, compile_ in (("eager", False), ("compiled", True)):  # the backend compiles as bigtrain does
        run_cfg = cfg.model_copy(update={"parallel": cfg.parallel.model_copy(update={"compile": compile_})})
        torch.manual_seed(cfg.seed)
        backends[kind] = LocalBackend(GPT(cfg.model).to(device), run_cfg, env)
    seq, rows = cfg.model.seq_len, cfg.batch.global_size
    tokens = torch.from_numpy(train.batch(range(rows), seq)).to(device)
    batch = Batch(0, rows, None, None, tokens)

    def step(backend):
        def run():
            backend.measure(batch, rows)
            backend.update(1e-4, cfg.optim.grad_clip)
            if device.type == "cuda":
                torch.cuda.synchronize()
        return run
    variants = {k: step(b) for k, b in backends.items()}
    compile_s = first_two(variants["compiled"])
    first_two(variants["eager"])
    return summary(interleaved(variants, rounds, steps), compile_s, "eager", "compiled")


def measure_optimizer(name: str, device: torch.device, tmp: Path, rounds: int, steps: int) -> dict:
    cfg, _ = size_config(name, tmp, 10)
    torch.manual_seed(cfg.seed)
    model = GPT(cfg.model).to(device)
    params = [p for p in model.parameters()]
    grads = [torch.randn_like(p) * 1e-3 for p in params]

    def make(**kind):
        copies = [p.detach().clone().requires_grad_() for p in params]
        for p, g in zip(copies, grads):
            p.grad = g.clone()
        return torch.optim.AdamW(copies, lr=1e-4, weight_decay=0.1, **kind)
    fused, plain = make(fused=True), make(foreach=False, fused=False)
    compiled_step = torch.compile(plain.step)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
    variants = {"fused": lambda: (fused.step(), sync()), "compiled": lambda: (compiled_step(), sync())}
    compile_s = first_two(variants["compiled"])
    first_two(variants["fused"])
    return summary(interleaved(variants, rounds, steps), compile_s, "fused", "compiled")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="tiny,25M,124M")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", default="tiny=20,25M=3,124M=2", help="steps per round, per size")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        keep_freed_host_memory()  # as bigtrain's CPU runs do (parallel.keep_host_memory: auto)
    steps = dict((k, int(v)) for k, v in (s.split("=") for s in args.steps.split(",")))
    tmp = Path(tempfile.mkdtemp(prefix="bigtrain-compile-"))
    out = {"device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
           "load_before": os.getloadavg()[0], "sizes": {}}
    for name in filter(None, args.sizes.split(",")):
        n = steps.get(name, 3)
        out["sizes"][name] = {"model": measure_model(name, device, tmp, args.rounds, n),
                              "optimizer": measure_optimizer(name, device, tmp, args.rounds, 4 * n)}
        print(json.dumps({name: out["sizes"][name]}), file=sys.stderr, flush=True)
    out["load_after"] = os.getloadavg()[0]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
