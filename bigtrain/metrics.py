"""Metrics: ``metrics.jsonl``, TensorBoard, the console, and MFU.

Only rank 0 writes. ``metrics.jsonl`` is the machine-readable record (one JSON
object per logged step; eval lines carry ``val_loss``); TensorBoard gets the same
scalars under ``train/`` and ``eval/``. The console shows a tqdm bar with ETA
on a terminal and a plain line per interval elsewhere, so SLURM logs stay
readable.

MFU = achieved FLOP/s / peak FLOP/s; where the peak comes from: bigtrain/peak.py.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

class Progress:
    """tqdm bar on a terminal; a plain line every logged step otherwise."""

    def __init__(self, mode: str, total: int, initial: int):
        self.bar = None
        if mode == "bar" or (mode == "auto" and sys.stderr.isatty()):
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
        self.plain = mode in ("plain", "auto") and self.bar is None
        self.total = total
        self.start = time.time()
        self.start_step = initial

    def update(self, step: int, record: dict) -> None:
        text = f"loss {record['loss']:.4f} lr {record['lr']:.2e} gnorm {record['grad_norm']:.3f} " \
               f"tok/s {record['tokens_per_s']:,.0f} mfu {record['mfu']:.1%}"
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix_str(text, refresh=True)
        elif self.plain:
            done = max(1, step - self.start_step)
            eta = (time.time() - self.start) / done * (self.total - step)
            print(f"step {step}/{self.total} {text} eta {eta / 60:.1f}m", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class MetricsLogger:
    """Writes scalars for rank 0; every other rank gets a logger that does nothing."""

    def __init__(self, run_dir: str, enabled: bool, tensorboard: bool, progress: str,
                 total_steps: int, start_step: int, wandb=None):
        self.enabled = enabled
        self.tb = None
        self.wandb = wandb  # a bigtrain.wandb_sink.WandbSink (rank 0, logging.wandb set) or None
        self.progress = None
        if not enabled:
            return
        self.path = Path(run_dir) / "metrics.jsonl"
        self.file = open(self.path, "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(Path(run_dir) / "tb"))
        self.progress = Progress(progress, total_steps, start_step) if progress != "off" else None

    def scalars(self, step: int, record: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **record}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self.tb.add_scalar(f"{prefix}/{k}", v, step)
        if self.wandb is not None:
            self.wandb.scalars(step, record, prefix)
        if prefix == "train" and self.progress is not None:
            self.progress.update(step, record)

    def histogram(self, step: int, name: str, values: torch.Tensor) -> None:
        if self.enabled and self.tb is not None:
            self.tb.add_histogram(name, values.detach().float().cpu(), step)

    def text(self, message: str) -> None:
        if self.enabled:
            print(message, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.close()
        if self.progress is not None:
            self.progress.close()
