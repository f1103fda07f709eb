"""What a mixture costs the sample order: microseconds per global batch of ``SampleOrder.sample_at``
for 1, 2, 4 and 8 sources, at a stream position deep into a run (with and without a mid-run weight
change), and the worst deviation from the weights in any window of ``window`` positions.

    python bench/mixture.py [--batch 512] [--repeat 200] [--window 400]

Prints JSON. The order is computed in the loader's background thread, one batch ahead, so
this is time the step does not wait for unless it exceeds a step.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from bigtrain.data.order import SampleOrder


def per_batch_us(order: SampleOrder, start: int, batch: int, repeat: int) -> float:
    times = []
    for i in range(repeat):
        positions = np.arange(start + i * batch, start + (i + 1) * batch)
        t0 = time.perf_counter()
        order.sample_at(positions)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def worst_window(order: SampleOrder, weights: list[float], window: int, start: int, n: int) -> float:
    """Largest |share - weight| of any source over every window of ``window`` consecutive positions."""
    source, _ = order.mixture.draw(np.arange(start, start + n))
    share = np.array(weights) / sum(weights)
    worst = 0.0
    for s in range(len(weights)):
        counts = np.convolve(source == s, np.ones(window), mode="valid") / window
        worst = max(worst, float(np.abs(counts - share[s]).max()))
    return worst


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--repeat", type=int, default=200)
    p.add_argument("--window", type=int, default=400)
    args = p.parse_args()
    start = 10**9  # a billion samples into the run
    out = {"batch": args.batch, "window": args.window, "sources": {}}
    for n in (1, 2, 4, 8):
        weights = [float(w) for w in np.linspace(1, 3, n)] if n > 1 else [1.0]
        order = SampleOrder([10**6 + 7 * i for i in range(n)], 1234, weights=weights)
        row = {"us_per_batch": per_batch_us(order, start, args.batch, args.repeat),
               "worst_window_deviation": worst_window(order, weights, args.window, start, 200_000)}
        if n > 1:  # the same after a weight change at position start - 10**6 (two segments)
            changed = SampleOrder(order.sizes, 1234, weights=weights[::-1], position=lambda: start - 10**6)
            changed.load_state_dict(order.state_dict() | {"mixture": order.mixture.history()})
            row["us_per_batch_after_change"] = per_batch_us(changed, start, args.batch, args.repeat)
        out["sources"][n] = row
    print(json.dumps(out))


if __name__ == "__main__":
    main()
