"""What ``model.doc_mask`` costs: forward + backward time of the same model on the same packed
windows with document masking off and on, for a few document lengths.

    python bench/docmask.py [--steps 5] [--repeats 5] [--sizes smoke,smoke-1k] [--precisions fp32,bf16]

Prints one JSON object. Tokens are random with end-of-document tokens placed so that
documents are geometric with the given mean length (what packing real text gives). The
optimizer step is left out: masking does not change it. On CPU the masked path is SDPA
with a dense block-diagonal causal mask (see bigtrain/model/doc_mask.py); on CUDA with
bf16 it is FlashAttention varlen. Each figure is the median over ``--repeats`` timings
of ``--steps`` steps, off and on alternating, so a machine shared with other jobs still gives
usable numbers; ``on_vs_off`` is the median of the per-repeat ratios.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time

import torch

from bigtrain.config import ModelConfig
from bigtrain.model.gpt import GPT, lm_loss

SIZES = {  # (model, windows per step): bench/common.py's smoke and 30M shapes, and the smoke model at a
    # context where attention is half the work
    "smoke": (dict(n_layer=4, n_head=4, d_model=128, seq_len=128), 8),
    "smoke-1k": (dict(n_layer=4, n_head=4, d_model=128, seq_len=1024), 1),
    "30M": (dict(n_layer=9, n_head=8, d_model=512, seq_len=256), 8),
}
VOCAB, EOT = 512, 511  # a small vocabulary, so the LM head does not drown the attention


def windows(batch: int, seq_len: int, mean_doc: int, seed: int = 0) -> torch.Tensor:
    """``batch`` windows of ``seq_len + 1`` tokens with an EOT after each document (lengths geometric)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, EOT, (batch, seq_len + 1), generator=g)
    idx[torch.rand(idx.shape, generator=g) < 1 / mean_doc] = EOT
    return idx


def train_step(model: GPT, idx: torch.Tensor, precision: str):
    """One forward + backward of ``model`` on ``idx`` (a closure, timed by :func:`timed_pair`)."""
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()

    def step():
        with autocast:
            logits = model(idx[:, :-1])
        ce, _ = lm_loss(logits, idx[:, 1:])
        ce.backward()
        model.zero_grad(set_to_none=True)
    return step


def timed_pair(off, on, steps: int, repeats: int) -> tuple[float, float, float]:
    """Median seconds per step of ``off`` and ``on``, and the median of their per-repeat ratio:
    the two alternate, so a load that comes and goes on a shared machine hits both alike."""
    for step in (off, on, off, on):  # warm-up
        step()
    t_off, t_on = [], []
    for _ in range(repeats):
        for step, times in ((off, t_off), (on, t_on)):
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            times.append((time.perf_counter() - t0) / steps)
    ratio = statistics.median(b / a for a, b in zip(t_off, t_on))
    return statistics.median(t_off), statistics.median(t_on), ratio


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sizes", default="smoke,smoke-1k", help=f"of {', '.join(SIZES)}")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--mean-docs", default="32,128,1024", help="mean document lengths in tokens")
    args = ap.parse_args()
    out = {"device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__,
           "steps": args.steps, "repeats": args.repeats, "results": []}
    for size in args.sizes.split(","):
        shape, batch = SIZES[size]
        off = GPT(ModelConfig(vocab_size=VOCAB, **shape))
        on = GPT(ModelConfig(vocab_size=VOCAB, doc_mask=True, eot_id=EOT, **shape))
        on.load_state_dict(off.state_dict())
        for precision in args.precisions.split(","):
            for mean_doc in map(int, args.mean_docs.split(",")):
                idx = windows(batch, shape["seq_len"], mean_doc)
                t_off, t_on, ratio = timed_pair(train_step(off, idx, precision), train_step(on, idx, precision),
                                                args.steps, args.repeats)
                tokens = idx[:, :-1].numel()
                out["results"].append({
                    "size": size, "precision": precision, "seq_len": shape["seq_len"], "batch": batch,
                    "mean_doc_tokens": mean_doc, "docs_per_window": round(1 + (idx[:, :-1] == EOT).sum().item() / batch, 1),
                    "off_ms": round(1e3 * t_off, 2), "on_ms": round(1e3 * t_on, 2),
                    "off_tokens_per_s": round(tokens / t_off), "on_tokens_per_s": round(tokens / t_on),
                    "on_vs_off": round(ratio, 3),
                })
                print(json.dumps(out["results"][-1]), file=sys.stderr, flush=True)  # progress
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
