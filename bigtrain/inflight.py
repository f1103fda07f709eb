"""A step's numbers on their way to the host, without making the host wait for the device.

A training step on CUDA is only queued by the CPU; reading any device value (``float(loss)``,
``if nonfinite``) makes the CPU wait until the device has caught up, and then the device waits
while the CPU prepares the next step. So the loop reads nothing inside a step: the verdict, the
skip and the clip are decided on the device, and what the host needs to know (loss, gradient
norm, verdict, clip factor, LR, stop requests) is packed into one vector, copied into pinned
host memory with ``non_blocking=True`` and marked with an event. The loop reads it a step
later (:meth:`InFlight.read`): by then the next step is queued behind it, so waiting for the
event never leaves the device idle (as torchtitan reads values on logging steps only, and
OLMo-core's skip-step optimizer decides on the device). On the CPU the staged value is the
value itself.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class InFlight:
    """One step whose values the host has not read yet."""
    step: int
    batch: object              # the Batch it read (its stream window, for the guard's records)
    applied: torch.Tensor      # 0-d bool on the device
    values: torch.Tensor       # on the host (pinned on CUDA), valid once ``event`` has completed
    event: torch.cuda.Event | None

    @classmethod
    def stage(cls, step: int, batch, applied: torch.Tensor, values: torch.Tensor) -> "InFlight":
        """Start copying ``values`` (a 1-d device tensor) to the host, without waiting."""
        event = None
        if values.device.type == "cuda":
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            host.copy_(values, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            values = host
        return cls(step, batch, applied, values, event)

    def read(self) -> list[float]:
        """The values, waiting for the copy if it is still under way."""
        if self.event is not None:
            self.event.synchronize()
        return self.values.tolist()


def to_device(values: list[float], device: torch.device) -> torch.Tensor:
    """Host numbers onto the device without waiting for it (through pinned memory on CUDA;
    a copy from pageable memory would synchronise). float32 on CUDA, where fused AdamW reads
    a tensor LR as float32; float64 on the CPU, where it reads it as a double, as it would a
    Python float."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=torch.float64)
    return torch.tensor(values, dtype=torch.float32).pin_memory().to(device, non_blocking=True)
