"""Peak FLOP/s: the denominator of MFU, one documented and reproducible number.

MFU = achieved FLOP/s / peak FLOP/s, with the achieved FLOPs per token from the model
(6N + 12·L·d·T). An MFU is only worth comparing if its peak is, so every peak says
where it came from (:attr:`Peak.source`, printed in the run's log):

* **GPUs**: dense (no 2:4 sparsity) tensor-core peaks from the vendors' datasheets,
  by model *and form factor*: an H100 SXM (989 TFLOP/s bf16) is not an H100 PCIe (756).
  fp32 means plain fp32 (torch's default matmul precision, no TF32). A V100 has no bf16
  tensor cores, so its bf16 peak is its fp32 rate. An unknown GPU gets no peak (MFU is
  logged as NaN) rather than a guess; ``BIGTRAIN_PEAK_FLOPS`` supplies one.
* **CPUs**: datasheets give no usable figure, so the peak is *measured*: the median of
  :data:`TRIALS` trials of sustained ``2048^3`` matmuls in the run's dtype at the run's
  thread count, each trial timed by the shorter of its wall time and its CPU time per
  thread, so a machine shared with other work (which steals wall time, not CPU time from
  the probe's threads) does not read low and cache an MFU above 100%. Small probes (512^3) read low (fp32: 35 against 139 GFLOP/s sustained
  on our CI machine) and inflate MFU up to 4x; a best-ever value creeps upward with noise.
  The first measurement per (CPU, threads, dtype, torch) is cached in
  ``BIGTRAIN_CACHE`` (default ``~/.cache/bigtrain``), so every later run on the machine
  uses the same number; delete the file to measure again.
* ``BIGTRAIN_PEAK_FLOPS=<FLOP/s per device>`` overrides both.
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bigtrain.errors import ConfigError

TRIALS = 5          # CPU probe: median of this many trials ...
MATMUL_SIZE = 2048  # ... of sustained n^3 matmuls (a few seconds in fp32 on one core, once per machine)

# (substrings that must all appear in the device name, label, bf16 peak, fp32 peak), dense FLOP/s.
# Checked in order: the form-factor-specific entries come before the generic one.
GPU_PEAKS = [
    (("H100", "PCIe"), "H100 PCIe", 756e12, 51.2e12),
    (("H100", "NVL"), "H100 NVL", 835e12, 60e12),
    (("H100",), "H100 SXM", 989e12, 67e12),
    (("H200", "NVL"), "H200 NVL", 835e12, 60e12),
    (("H200",), "H200 SXM", 989e12, 67e12),
    (("A100",), "A100 (SXM or PCIe)", 312e12, 19.5e12),
    (("L40S",), "L40S", 362e12, 91.6e12),
    (("L4",), "L4", 121e12, 30.3e12),
    (("A10G",), "A10G", 70e12, 31.2e12),
    (("V100", "PCIE"), "V100 PCIe (no bf16 tensor cores)", 14e12, 14e12),
    (("V100",), "V100 SXM2 (no bf16 tensor cores)", 15.7e12, 15.7e12),
]


@dataclass(frozen=True)
class Peak:
    flops: float  # FLOP/s of one device; NaN when unknown
    source: str   # where the number comes from, for the log


def gpu_peak(name: str, precision: str) -> Peak:
    """The datasheet peak of the GPU called ``name`` (as ``torch.cuda.get_device_name`` says)."""
    upper = name.upper()
    for needles, label, bf16, fp32 in GPU_PEAKS:
        if all(n.upper() in upper for n in needles):
            flops = bf16 if precision == "bf16" else fp32
            return Peak(flops, f"datasheet, {label}, {precision} dense: {flops / 1e12:g} TFLOP/s")
    return Peak(math.nan, f"unknown GPU {name!r}: no peak, MFU not computed (set BIGTRAIN_PEAK_FLOPS)")


def measure_cpu_matmul(dtype: torch.dtype, n: int = MATMUL_SIZE, trials: int = TRIALS) -> float:
    """Median FLOP/s of ``trials`` timings of two back-to-back ``n^3`` matmuls (after a warm-up),
    each timed by ``min(wall, process CPU time / threads)``: time the threads spent waiting
    for a core another process held is not compute time (OpenMP threads that spin while
    they wait count as CPU time, so the wall clock stays the bound then)."""
    g = torch.Generator().manual_seed(0)  # its own: a probe must not move the run's RNG (dropout)
    a, b = torch.randn(n, n, generator=g).to(dtype), torch.randn(n, n, generator=g).to(dtype)
    a @ b
    rates = []
    for _ in range(trials):
        t0, c0 = time.perf_counter(), time.process_time()
        a @ b
        a @ b
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        rates.append(2 * 2 * n**3 / min(wall, cpu / torch.get_num_threads()))
    return statistics.median(rates)


def cpu_peak(precision: str) -> Peak:
    """The measured sustained matmul rate of this CPU, cached after its first measurement."""
    threads = torch.get_num_threads()
    key = (f"{platform.processor() or platform.machine()}|{os.cpu_count()}cpu|{threads}t|{precision}|"
           f"torch{torch.__version__}|n{MATMUL_SIZE}x{TRIALS}")
    cache = Path(os.environ.get("BIGTRAIN_CACHE", Path.home() / ".cache" / "bigtrain")) / "cpu_peak_v3.json"
    try:
        table = json.loads(cache.read_text())
    except (OSError, ValueError):
        table = {}
    how = f"median of {TRIALS} trials of {MATMUL_SIZE}^3 {precision} matmuls on {threads} thread(s)"
    if key in table:
        return Peak(table[key], f"measured, {how}, cached in {cache}: {table[key] / 1e9:.0f} GFLOP/s")
    flops = measure_cpu_matmul(torch.bfloat16 if precision == "bf16" else torch.float32, MATMUL_SIZE)
    try:  # another process may write at the same time: write aside, then rename
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**table, key: flops}))
        tmp.replace(cache)
    except OSError:
        pass
    return Peak(flops, f"measured now, {how}: {flops / 1e9:.0f} GFLOP/s")


def peak_flops(device: torch.device, precision: str) -> Peak:
    """The peak FLOP/s of one ``device`` for ``precision`` (bf16 | fp32), and its source."""
    if override := os.environ.get("BIGTRAIN_PEAK_FLOPS"):
        try:
            return Peak(float(override), f"BIGTRAIN_PEAK_FLOPS={override}")
        except ValueError:
            raise ConfigError(f"BIGTRAIN_PEAK_FLOPS={override!r} is not a number of FLOP/s") from None
    if device.type == "cuda":
        return gpu_peak(torch.cuda.get_device_name(device), precision)
    return cpu_peak(precision)
