"""bigtrain's fixed per-step cost: its training loop against a bare nanoGPT-style loop.

    python bench/overhead.py [--sizes tiny,25M,124M] [--repeats 3] [--timed-steps N]
                             [--recipe-steps 2000] [--recipe-repeats 3]

Prints one JSON object. Three sizes (fp32 for the char model as nanoGPT runs it on a CPU,
bf16 autocast for the others):

* ``tiny``: nanoGPT's CPU recipe (4 layers x 4 heads x 128, context 64, batch 12, char-level
  tiny Shakespeare; 0.8M parameters);
* ``25M``: 8 x 8 x 512, context 128, batch 8 (bytes);
* ``124M``: the gpt2-124m preset at context 64, batch 4 (byte tokens under a 50257 vocabulary).

Both loops build the same model (bigtrain's GPT, same seed) and the same optimizer
(bigtrain's AdamW and parameter groups, at the same LR schedule); the bare loop reads
random windows of the same memory-mapped tokens synchronously, clips with
``clip_grad_norm_`` and reads the loss on logging steps (every 10), as nanoGPT does.
Wall time per step is measured between step starts after a warm-up, alternating the two
loops ``--repeats`` times; medians are reported, and so is the process's CPU time per step
(``cpu_ms_per_step``: all its threads, the loader's included), which another process on the
same cores disturbs far less than the wall time. ``phases_cpu_ms`` is the per-step breakdown
from the same timed runs: the main thread's CPU time in each ``bigtrain/<phase>`` range of
:mod:`bigtrain.phases` (which the bare loop labels too; :class:`PhaseClock`).
``prefetch_ready`` is the fraction of steps whose batch the loader's thread had finished
before the loop asked for it. ``interleaved``: the same comparison with the two loops' steps
taken in turn in one process (``--repeats`` x the timed steps of pairs; :func:`measure_interleaved`),
the figure to trust on a machine whose speed drifts between runs.

``recipe``: the whole small recipe, start-up included, as separate processes (``--recipe-steps``
steps, ``--recipe-repeats`` rounds): ``bench/recipe.py``. What ``torch.compile`` buys:
``bench/compile.py``. Host memory: bigtrain keeps freed memory on CPU runs
(``parallel.keep_host_memory``, process-wide), so the in-process comparisons here run both loops
with it; what it buys alone: ``bench/allocator.py``.

The machine may be shared: wall timings are noisy; see ``load_before``/``load_after`` (and
prefer the CPU figures while the load average is above the number of cores).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bigtrain.config import load_config
from bigtrain.data.prepare import prepare
from bigtrain.data.splits import open_splits
from bigtrain.host_memory import keep_freed_host_memory
from bigtrain.model.gpt import GPT, lm_loss
from bigtrain.optim import build_optimizer, lr_at, param_groups
from bigtrain.parallel.base import prepare_blocks
from bigtrain.parallel.env import DistEnv
from bigtrain.phases import PHASES, phase
from bigtrain.phases import phase as phase_range
from common import SHAKESPEARE

CPU = DistEnv(0, 1, 0, torch.device("cpu"))
QUIET = ["logging.tensorboard=false", "logging.progress=off", "eval.batches=0", "checkpoint.every=0",
         "checkpoint.resume=never", "logging.every=10", "schedule.warmup_steps=100"]
SIZES = {  # overrides, tokenizer, vocab override, warm-up steps, timed steps
    "tiny": (["model.n_layer=4", "model.n_head=4", "model.d_model=128", "model.seq_len=64", "model.bias=false",
              "batch.global_size=12", "batch.micro_size=12", "parallel.precision=fp32", "optim.lr=1e-3"],
             "char", None, 20, 100),
    "25M": (["model.n_layer=8", "model.n_head=8", "model.d_model=512", "model.seq_len=128",
             "batch.global_size=8", "batch.micro_size=8", "parallel.precision=bf16"], "bytes", None, 3, 8),
    "124M": (["model.preset=gpt2-124m", "model.seq_len=64", "batch.global_size=4", "batch.micro_size=4",
              "parallel.precision=bf16"], "bytes", 50257, 2, 5),
}


def data_dir(tokenizer: str, tmp: Path) -> str:
    out = tmp / f"data-{tokenizer}"
    if not out.exists():
        prepare(str(SHAKESPEARE) if SHAKESPEARE.is_file() else "stdlib", tokenizer, str(out), overwrite=True)
    return str(out)


def size_config(name: str, tmp: Path, steps: int):
    overrides, tokenizer, vocab, _, _ = SIZES[name]
    cfg = load_config(overrides=QUIET + overrides + [
        f"data.path={data_dir(tokenizer, tmp)}", f"run_dir={tmp / 'runs' / name}", f"schedule.max_steps={steps}"])
    data, train, val = open_splits(cfg)
    if vocab is not None:  # byte tokens under GPT-2's vocabulary: the model's size is what is measured
        data = copy.copy(data)
        data.vocab_size = vocab
    return cfg, (data, train, val)


# ---------------------------------------------------------------- the bare loop (nanoGPT's shape)
class BareStep:
    """nanoGPT's training step around bigtrain's model: random windows read synchronously,
    forward and backward, ``clip_grad_norm_``, AdamW; the loss read on logging steps.

    ``optimizer``: ``"fused"`` is bigtrain's own AdamW (torch's fused kernel), so that the two
    loops differ only in what the loop around the model does; ``"torch"`` is AdamW as nanoGPT's
    ``configure_optimizers`` builds it off CUDA, torch's default implementation (a loop over the
    parameters on a CPU): the same hyperparameters and groups, the loop a user writes."""

    def __init__(self, cfg, split, optimizer: str = "fused"):
        torch.manual_seed(cfg.seed)
        self.model = GPT(cfg.model)
        prepare_blocks(self.model, cfg, torch.device("cpu"))  # per-block compile where bigtrain's rule would
        self.opt = build_optimizer(self.model, cfg) if optimizer == "fused" else torch_adamw(self.model, cfg)
        self.cfg, self.split, self.it = cfg, split, 0
        self.gen = torch.Generator().manual_seed(cfg.seed)

    def __call__(self, log_every: int = 10) -> None:
        cfg, split, model, opt = self.cfg, self.split, self.model, self.opt
        seq, rows = cfg.model.seq_len, cfg.batch.global_size
        for group in opt.param_groups:
            group["lr"] = lr_at(self.it, rows, cfg)
        with phase("data"):
            ix = torch.randint(split.tokens - seq - 1, (rows,), generator=self.gen).tolist()
            x = torch.from_numpy(np.stack([split.read(i, seq + 1) for i in ix]))
        with phase("forward_backward"):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.parallel.precision == "bf16"):
                logits = model(x[:, :-1])
            ce, _ = lm_loss(logits, x[:, 1:])
            loss = ce / x[:, 1:].numel()
            loss.backward()
        with phase("optimizer"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        self.it += 1
        if self.it % log_every == 0:
            with phase("log"):
                print(f"iter {self.it}: loss {loss.item():.4f}", flush=True)


def torch_adamw(model, cfg, **implementation) -> torch.optim.AdamW:
    """torch's AdamW on bigtrain's groups and settings; ``implementation``: fused=/foreach=."""
    o = cfg.optim
    return torch.optim.AdamW(param_groups(model, o.weight_decay, o.decay_embeddings), lr=o.lr,
                             betas=tuple(o.betas), eps=o.eps, **implementation)


def bare_loop(cfg, split, steps: int, log_every: int = 10, save: Path | None = None, evals=None,
              warm: int = 0, optimizer: str = "fused") -> list[tuple]:
    """nanoGPT's training loop (:class:`BareStep`, an eval every ``evals[0]`` steps); returns each
    step's :func:`mark` (the phase clock counts from step ``warm`` on)."""
    step, marks = BareStep(cfg, split, optimizer), []
    for it in range(steps):
        marks.append(mark(len(marks) == warm))
        step(log_every)
        if evals is not None and (it + 1) % evals[0] == 0:
            evaluate(step.model, evals[1], cfg, evals[2])
    if save is not None:
        torch.save({"model": step.model.state_dict(), "optimizer": step.opt.state_dict()}, save)
    return marks


@torch.no_grad()
def evaluate(model, split, cfg, batches: int) -> float:
    model.eval()
    seq, rows, total = cfg.model.seq_len, cfg.batch.global_size, 0.0
    batches = min(batches, split.num_samples(seq) // rows)  # as bigtrain's eval: no more than the split holds
    for b in range(batches):
        x = torch.from_numpy(split.batch(range(b * rows, (b + 1) * rows), seq))
        total += float(lm_loss(model(x[:, :-1]), x[:, 1:])[0]) / x[:, 1:].numel()
    model.train()
    return total / max(batches, 1)


# ---------------------------------------------------------------- bigtrain's loop
def bigtrain_loop(cfg, splits, stats: dict | None = None, warm: int = 0, before_step=None) -> list[tuple]:
    """``Trainer.fit`` as it runs; returns each step's :func:`mark` (``stats`` gets prefetch counts;
    ``before_step()``, if given, runs at each step's start, before its batch is asked for)."""
    from bigtrain.trainer import Trainer  # here: the bare recipe's process imports no more than it uses
    run_dir = Path(cfg.run_dir)
    cfg = cfg.model_copy(update={"run_dir": str(run_dir.parent / f"{run_dir.name}-{time.time_ns()}")})
    trainer = Trainer(cfg, CPU, splits)
    marks, get = [], trainer.loader.get

    def timed_get(position, size, next_size=None):
        if before_step is not None:
            before_step()
        marks.append(mark(len(marks) == warm))
        if stats is not None:
            pending = trainer.loader.pending
            stats["ready"] = stats.get("ready", 0) + bool(pending is not None and pending[1].done())
            stats["asked"] = stats.get("asked", 0) + 1
        return get(position, size, next_size)

    trainer.loader.get = timed_get
    try:
        trainer.fit()
    finally:
        trainer.close()
    return marks


def mark(restart_clock: bool = False) -> tuple[float, float]:
    """A step's start: wall time and this process's CPU time (all its threads: the loader's too);
    ``restart_clock``: the phase clock counts from here (after the warm-up)."""
    if restart_clock:
        CLOCK.totals.clear()
    CLOCK.at_step_start()
    return time.perf_counter(), time.process_time()


def per_step_ms(marks: list[tuple], warm: int, clock: int = 0) -> float:
    """Milliseconds per step after ``warm`` steps; ``clock`` 0: wall, 1: CPU."""
    return (marks[-1][clock] - marks[warm][clock]) / (len(marks) - 1 - warm) * 1e3


class PhaseClock:
    """The main thread's CPU time in each named phase, per step (``with clock.phase(name)``, put in
    place of :func:`bigtrain.phases.phase` in the modules that label the step). Why CPU time, not
    the profiler's wall ranges: on a shared machine another process can take the core in the
    middle of any phase, and the profiler inflates small ops; a thread's CPU time is what this
    code itself spends, whoever else runs."""

    MODULES = ("bigtrain.trainer", "bigtrain.parallel.base", __name__)

    def __init__(self):
        self.totals: dict[str, float] = {}
        self.until_last_start: dict[str, float] = {}  # the totals at the newest step start

    def at_step_start(self) -> None:
        """What :meth:`per_step` counts ends here: the last step and the final save are left
        out, as the per-step times between step starts leave them out."""
        self.until_last_start = dict(self.totals)

    def install(self) -> None:
        for module in self.MODULES:
            importlib.import_module(module).phase = self.phase

    @contextlib.contextmanager
    def phase(self, name: str):
        start = time.thread_time()
        with phase_range(name):
            yield
        self.totals[name] = self.totals.get(name, 0.0) + time.thread_time() - start

    def per_step(self, steps: int) -> dict:
        """Milliseconds per step over the ``steps`` steps between the warm-up and the last start."""
        totals = self.until_last_start
        return {p: round(totals[p] / steps * 1e3, 3) for p in PHASES if p in totals}


CLOCK = PhaseClock()


def measure_size(name: str, tmp: Path, repeats: int, timed: int | None = None) -> dict:
    """Both loops ``repeats`` times, alternating (A B A B ...): medians of wall and CPU time per
    step and of each phase's CPU time per step."""
    _, _, _, warm, steps = SIZES[name]
    steps = timed or steps
    cfg, splits = size_config(name, tmp, warm + steps)
    runs = {"bare": lambda: bare_loop(cfg, splits[1], warm + steps, warm=warm),
            "bigtrain": lambda: bigtrain_loop(cfg, splits, stats, warm=warm)}
    (wall, cpu, first, phases), stats = ({k: [] for k in runs} for _ in range(4)), {}
    CLOCK.install()
    for _ in range(repeats):
        for kind, run in runs.items():
            marks = run()
            wall[kind].append(per_step_ms(marks, warm))
            cpu[kind].append(per_step_ms(marks, warm, clock=1))
            first[kind].append((marks[1][0] - marks[0][0]) * 1e3)
            phases[kind].append(CLOCK.per_step(len(marks) - 1 - warm))
    med = {k: statistics.median(v) for k, v in wall.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu.items()}
    return {
        "params_M": round(GPT(cfg.model).num_params() / 1e6, 2), "precision": cfg.parallel.precision,
        "batch": cfg.batch.global_size, "seq_len": cfg.model.seq_len, "timed_steps": steps, "repeats": repeats,
        "bare_ms_per_step": round(med["bare"], 2), "bigtrain_ms_per_step": round(med["bigtrain"], 2),
        "difference_ms": round(med["bigtrain"] - med["bare"], 2),
        "bigtrain_vs_bare": round(med["bigtrain"] / med["bare"], 4),
        "all_ms": {k: [round(x, 2) for x in v] for k, v in wall.items()},
        "cpu_ms_per_step": {k: round(v, 2) for k, v in cpu_med.items()},
        "cpu_bigtrain_vs_bare": round(cpu_med["bigtrain"] / cpu_med["bare"], 4),
        "all_cpu_ms": {k: [round(x, 2) for x in v] for k, v in cpu.items()},
        "first_step_ms": {k: round(statistics.median(v), 1) for k, v in first.items()},
        "prefetch_ready": round(stats["ready"] / max(1, stats["asked"]), 3),
        "phases_cpu_ms": {k: {p: round(statistics.median(r.get(p, 0.0) for r in v), 3) for p in v[0]}
                          for k, v in phases.items()},
    }


def measure_interleaved(name: str, tmp: Path, steps: int) -> dict:
    """The two loops' steps interleaved in one process: before each of bigtrain's steps
    (``Trainer.fit`` as it runs) one bare step runs, so the two steps of a pair meet the same
    machine. Why: this machine's speed drifts by more than the difference between whole runs
    minutes apart (the same loop 44 -> 52 ms a step). The bare step runs before bigtrain's batch
    is asked for, while bigtrain's loader thread is idle. Medians of each loop's step times after
    the warm-up (wall; ``cpu``: the main thread's CPU time) and of the pairs' wall-time ratios."""
    warm = SIZES[name][3]
    cfg, splits = size_config(name, tmp, warm + steps)
    bare, times, last = BareStep(cfg, splits[1]), {"bare": [], "bigtrain": []}, []

    def clocks() -> tuple[float, float]:
        return time.perf_counter(), time.thread_time()

    def before_step():  # bigtrain's previous step ended here; the bare one runs now
        now = clocks()
        if last:
            times["bigtrain"].append([a - b for a, b in zip(now, last[-1])])
        bare()
        last.append(clocks())
        times["bare"].append([a - b for a, b in zip(last[-1], now)])

    bigtrain_loop(cfg, splits, before_step=before_step)
    pairs = list(zip(times["bare"], times["bigtrain"]))[warm:]  # bigtrain's last step has no pair

    def med(kind: int, clock: int) -> float:
        return statistics.median(p[kind][clock] for p in pairs) * 1e3
    return {"pairs": len(pairs), "bare_ms": round(med(0, 0), 2), "bigtrain_ms": round(med(1, 0), 2),
            "bigtrain_vs_bare": round(med(1, 0) / med(0, 0), 4),
            "cpu_ms": {"bare": round(med(0, 1), 2), "bigtrain": round(med(1, 1), 2)},
            "cpu_bigtrain_vs_bare": round(med(1, 1) / med(0, 1), 4),
            "pair_ratio_median": round(statistics.median(b[0] / a[0] for a, b in pairs), 4)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="tiny,25M,124M")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--timed-steps", type=int, default=None, help="timed steps per loop (default: per size)")
    ap.add_argument("--recipe-steps", type=int, default=2000, help="0: skip the whole-recipe comparison")
    ap.add_argument("--recipe-repeats", type=int, default=3)
    args = ap.parse_args()
    keep_freed_host_memory()  # both in-process loops on the allocator bigtrain's Trainer sets
    with tempfile.TemporaryDirectory(prefix="bigtrain-overhead-") as scratch:  # the runs' checkpoints: GBs at 124M
        tmp = Path(scratch)
        out = {"threads": torch.get_num_threads(), "load_before": os.getloadavg()[0], "sizes": {}}
        for name in filter(None, args.sizes.split(",")):  # --sizes "": the recipe only
            out["sizes"][name] = measure_size(name, tmp, args.repeats, timed=args.timed_steps)
            steps = (args.timed_steps or SIZES[name][4]) * args.repeats
            out["sizes"][name]["interleaved"] = measure_interleaved(name, tmp, steps)
        if args.recipe_steps:
            from recipe import recipe  # bench/recipe.py, which imports this file
            out["recipe"] = recipe(tmp, args.recipe_steps, args.recipe_repeats)
        out["load_after"] = os.getloadavg()[0]
        print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
