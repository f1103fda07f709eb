"""Where this process stands: rank, world, device, and the process group.

torchrun, the ``deepspeed`` launcher and SLURM all describe a process with
environment variables; we read them once, here, so the rest of the code asks
``env.rank`` and never the environment. CUDA gets nccl with one device per local
rank; CPU gets gloo. One process starts a process group only when its backend
needs one (FSDP and DeepSpeed shard over a group, even a group of one).

A rank that raises must end the whole job at once: its peers are blocked in a
collective that would otherwise wait for the full process-group timeout.
:func:`fail_fast` prints the traceback and leaves with ``os._exit``, skipping
every cleanup that could itself block; torchrun or the deepspeed launcher then
sees a dead worker and stops the others.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import random
import shutil
import subprocess
import sys
import traceback
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from bigtrain.config import ConfigError


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if os.environ.get(name):
            return int(os.environ[name])
    return default


def _in_slurm_step() -> bool:
    """Started by ``srun`` without torchrun. The batch script itself also sees
    ``SLURM_NTASKS`` but is one process; only a job step sets ``SLURM_STEP_NUM_TASKS``."""
    return "RANK" not in os.environ and "SLURM_STEP_NUM_TASKS" in os.environ


def process_layout() -> tuple[int, int, int]:
    """``(rank, world, local_rank)`` from torchrun/deepspeed (``RANK`` ...) or an srun step."""
    if _in_slurm_step():
        return (_env_int("SLURM_PROCID", default=0), _env_int("SLURM_STEP_NUM_TASKS", default=1),
                _env_int("SLURM_LOCALID", default=0))
    return (_env_int("RANK", default=0), _env_int("WORLD_SIZE", default=1),
            _env_int("LOCAL_RANK", default=0))


def world_size() -> int:
    """How many processes this launch has (checked against the batch before any group starts)."""
    return process_layout()[1]


def _slurm_rendezvous() -> tuple[str, str]:
    """Head node of the step and a port derived from the job id (jobs sharing a node differ)."""
    head = "127.0.0.1"
    nodes = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST")
    if nodes and shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True)
        head = (out.stdout.split() or [head])[0]
    return head, str(20000 + _env_int("SLURM_JOB_ID", default=0) % 20000)


@dataclass
class DistEnv:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    # Tensor-parallel degree: the world is a (dp, tp) mesh in row-major order, so ranks
    # dp_rank * tp ... dp_rank * tp + tp - 1 form one tp group (one node's GPUs). The data is
    # split over dp ranks only: a tp group reads the same rows and computes one loss.
    tp: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp

    @property
    def dp_size(self) -> int:
        return self.world // self.tp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    def with_tp(self, tp: int) -> "DistEnv":
        """This process under a layout of ``tp``-way tensor parallelism (world % tp == 0 is
        checked with the config: bigtrain/parallel/tp.py)."""
        return dataclasses.replace(self, tp=tp)

    def mesh(self):
        """The ``(dp, tp)`` device mesh over the world (a collective: every rank calls it once)."""
        from torch.distributed.device_mesh import init_device_mesh
        return init_device_mesh(self.device.type, (self.dp_size, self.tp), mesh_dim_names=("dp", "tp"))

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In-place all-reduce that is a no-op on one process. ``op``: sum | max | min."""
        if self.distributed:
            dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
                                   "min": dist.ReduceOp.MIN}[op])
        return t

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on any rank (the OR of local flags)."""
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return bool(self.all_reduce(t, "max").item() > 0)

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every rank (a picklable value; a collective)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def pick_device(kind: str, local_rank: int) -> torch.device:
    if kind == "cuda" or (kind == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("config error: parallel.device = 'cuda' but CUDA is not available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _attempt_store(timeout: datetime.timedelta):
    """The rendezvous store of this attempt, when torchrun restarted the job (``--max-restarts``).

    torchrun's default (static) rendezvous hands every attempt the same store with the
    same keys, so a restarted rank can read a dead rank's address and fail to connect.
    Prefixing the keys with the attempt number gives each attempt a clean slate.
    None outside torchrun: ``env://`` as usual.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timeout)
    return dist.PrefixStore(f"bigtrain/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


# How long a collective may wait for a peer before the job fails (a lost rank, a hung node).
GROUP_TIMEOUT = datetime.timedelta(minutes=10)


def init_distributed(device_kind: str = "auto", group: bool = False) -> DistEnv:
    """Start the process group when launched with more than one process, or when
    ``group`` (a sharding backend on one process: a group of one, no network).

    The backend follows the device: nccl for CUDA, gloo for CPU. SLURM variables
    are a fallback for ``srun python -m bigtrain train`` without torchrun.
    """
    rank, world, local_rank = process_layout()
    device = pick_device(device_kind, local_rank)
    if (world > 1 or group) and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        if _in_slurm_step() and "MASTER_ADDR" not in os.environ:
            os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = _slurm_rendezvous()
        # what torchrun would have set; DeepSpeed reads these too
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank))
        if world == 1:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=GROUP_TIMEOUT, **kwargs)
        else:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29500")
            dist.init_process_group(backend, timeout=GROUP_TIMEOUT, store=_attempt_store(GROUP_TIMEOUT),
                                    rank=rank, world_size=world, **kwargs)
    return DistEnv(rank=rank, world=world, local_rank=local_rank, device=device)


def shutdown() -> None:
    """Leave the process group at a normal end, every rank together, so no rank tears its
    connections down while a peer still completes its last collective. The process then
    leaves with ``os._exit`` (``bigtrain/__main__.py``: gloo could abort a finished rank in the
    interpreter's teardown). Error paths never get here (:func:`fail_fast` leaves with ``os._exit``)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def fail_fast(env: DistEnv):
    """Around a rank's work: on one process, exceptions propagate as usual. With
    several, an exception ends this process now (traceback printed, or the one
    line of a :class:`ConfigError`, exit 2), so the launcher tears the job down
    in seconds instead of peers waiting out the collective timeout."""
    try:
        yield
    except (Exception, KeyboardInterrupt) as e:
        if not env.distributed:
            raise
        if isinstance(e, ConfigError):
            print(f"[rank {env.rank}] {e}", file=sys.stderr)
        else:
            print(f"[rank {env.rank}] failed; ending the job:", file=sys.stderr)
            traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2 if isinstance(e, ConfigError) else 1)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch. Ranks share the seed: the model init must be
    identical everywhere (the trainer reseeds torch per rank afterwards, for dropout)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
