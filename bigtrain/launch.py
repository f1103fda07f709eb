"""``bigtrain launch``: the torchrun or deepspeed command for a config, printed, then run.

A user should not have to remember two launchers' flags. ``bigtrain launch
CONFIG.yaml [MORE.yaml ...] --nproc-per-node N [key=value ...]`` picks the
launcher from the config (``torchrun`` for ``parallel.backend: none | fsdp``, the
``deepspeed`` launcher for ``deepspeed``; ``--launcher`` overrides), prints the
exact command, so it can be copied into a job script, and runs it with every
file and override passed through, in order.

It stays the launcher's parent, because a launcher cannot say why its job ended:
torchrun exits 1 whichever rank failed and why. When the job failed and
``RUN_DIR/ABORTED`` exists (the stability guard gave up on the run), the exit
status is 3, which job scripts must not retry (slurm/common.sh does not requeue
it); otherwise it is the launcher's own (128 + N when killed by signal N).
SIGTERM, SIGINT and SIGHUP sent to this process are passed on to the launcher.
A signal sent to the whole process group (Ctrl-C) or to every process of a SLURM
step reaches the launcher twice, directly and from here; torchrun and the ranks
(bigtrain/signals.py) treat a repeat as the same request. SIGUSR1 is turned into
``RUN_DIR/STOP`` (checkpoint and stop at the next step), as the sbatch scripts do,
because torchrun's agent would die of it without telling the ranks.

Everything that can be checked is checked first, in this one process: the
config, the data directory, and that the world size divides every batch size,
so a bad launch ends in a second with one line and exit status 2, before any
rank starts.

Several nodes: run the same command on every node with ``--nnodes``,
``--node-rank`` and ``--rdzv-endpoint HOST:PORT`` (the first node). torchrun
meets there through its c10d rendezvous. The deepspeed launcher normally ssh-es
into the other nodes from a hostfile; here each node starts its own launcher
(``--no_ssh``), and the hostfile we write only tells every node how many ranks
each node has (DeepSpeed uses the names as labels, the rendezvous is the endpoint).
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bigtrain.config import Config, ConfigError, load_config

# What each backend is launched with when --launcher is not given.
DEFAULT_LAUNCHER = {"none": "torchrun", "fsdp": "torchrun", "deepspeed": "deepspeed"}


@dataclass
class Topology:
    nproc_per_node: int
    nnodes: int = 1
    node_rank: int | None = None
    rdzv_endpoint: str | None = None   # HOST:PORT of the first node

    @property
    def world(self) -> int:
        return self.nproc_per_node * self.nnodes

    def check(self, launcher: str) -> None:
        if self.nproc_per_node < 1 or self.nnodes < 1:
            raise ConfigError(f"launch: --nproc-per-node={self.nproc_per_node} and --nnodes={self.nnodes} "
                              "must be at least 1")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ConfigError(f"launch: --nnodes={self.nnodes} needs --rdzv-endpoint HOST:PORT (the first node)")
        if self.rdzv_endpoint and not self.rdzv_endpoint.rpartition(":")[2].isdigit():
            raise ConfigError(f"launch: --rdzv-endpoint={self.rdzv_endpoint!r} is not HOST:PORT")
        if self.node_rank is not None and not 0 <= self.node_rank < self.nnodes:
            raise ConfigError(f"launch: --node-rank={self.node_rank} is outside 0..{self.nnodes - 1}")
        if launcher == "deepspeed" and self.nnodes > 1 and self.node_rank is None:
            raise ConfigError("launch: the deepspeed launcher on several nodes needs --node-rank on each node")


def _tool(name: str, module: str) -> list[str]:
    """The launcher installed next to this python (a venv's bin/), else ``python -m module``."""
    script = Path(sys.executable).parent / name
    return [str(script)] if script.is_file() else [sys.executable, "-m", module]


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def torchrun_command(topo: Topology) -> list[str]:
    cmd = _tool("torchrun", "torch.distributed.run") + [f"--nproc-per-node={topo.nproc_per_node}"]
    if topo.nnodes == 1 and not topo.rdzv_endpoint:
        return cmd + ["--standalone"]  # a local rendezvous on a free port
    cmd += [f"--nnodes={topo.nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={topo.rdzv_endpoint}",
            f"--rdzv-id={os.environ.get('SLURM_JOB_ID', 'bigtrain')}"]
    return cmd + ([f"--node-rank={topo.node_rank}"] if topo.node_rank is not None else [])


def deepspeed_command(topo: Topology, hostfile: Path) -> list[str]:
    cmd = _tool("deepspeed", "deepspeed.launcher.runner")
    host, _, port = (topo.rdzv_endpoint or f"127.0.0.1:{_free_port()}").rpartition(":")
    if topo.nnodes == 1:
        return cmd + [f"--num_gpus={topo.nproc_per_node}", f"--master_port={port}"]
    return cmd + [f"--hostfile={hostfile}", "--no_ssh", f"--node_rank={topo.node_rank}",
                  f"--master_addr={host}", f"--master_port={port}"]


def write_hostfile(topo: Topology, hostfile: Path) -> None:
    hostfile.parent.mkdir(parents=True, exist_ok=True)
    hostfile.write_text("".join(f"node{i} slots={topo.nproc_per_node}\n" for i in range(topo.nnodes)))


def launch_env(cfg: Config, topo: Topology, launcher: str) -> dict[str, str]:
    """Variables the ranks need that the launcher does not set: on a CPU-only machine,
    DeepSpeed's CPU accelerator and a fair share of the cores per rank."""
    import torch
    extra = {}
    if cfg.parallel.device == "cpu" or not torch.cuda.is_available():
        if launcher == "deepspeed" or cfg.parallel.backend == "deepspeed":
            extra["DS_ACCELERATOR"] = "cpu"
        extra["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // topo.nproc_per_node))
    return {k: v for k, v in extra.items() if k not in os.environ}


@dataclass
class Plan:
    command: list[str]
    env: dict[str, str]                 # set for the ranks, on top of ours
    run_dir: Path                       # where the job's RUN_DIR/ABORTED and STOP live
    hostfile: Path | None = None        # written just before a multi-node deepspeed launch


def build(files: list[str] | str, overrides: list[str], topo: Topology, launcher: str | None = None) -> Plan:
    """What to run for the config ``files`` (layered in order) and ``overrides`` on ``topo``;
    raises ConfigError on bad input."""
    files = [files] if isinstance(files, str) else list(files)
    cfg = load_config(*files, overrides=overrides)  # before importing torch: a bad config is answered at once
    from bigtrain.data.splits import check_world

    launcher = launcher or DEFAULT_LAUNCHER[cfg.parallel.backend]
    topo.check(launcher)
    check_world(cfg, topo.world)
    if not os.path.isdir(cfg.data.path):
        raise ConfigError(f"data.path {cfg.data.path!r} does not exist; run `bigtrain prepare` first")
    train = ["train", *files, *overrides]
    env = launch_env(cfg, topo, launcher)
    if launcher == "torchrun":
        return Plan(torchrun_command(topo) + ["-m", "bigtrain", *train], env, Path(cfg.run_dir))
    hostfile = Path(cfg.run_dir) / "hostfile"
    cmd = deepspeed_command(topo, hostfile) + ["--module", "bigtrain", *train]
    return Plan(cmd, env, Path(cfg.run_dir), hostfile if "--no_ssh" in cmd else None)


def run(plan: Plan) -> int:
    """Run the plan's command to the end, passing signals on; its status, or 3 if the run aborted."""
    proc = subprocess.Popen(plan.command, env={**os.environ, **plan.env})

    def pass_on(signum, frame):
        if signum == signal.SIGUSR1:
            plan.run_dir.mkdir(parents=True, exist_ok=True)
            (plan.run_dir / "STOP").touch()
        else:
            proc.send_signal(signum)

    forwarded = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
    previous = {sig: signal.signal(sig, pass_on) for sig in forwarded}
    try:
        status = proc.wait()  # retried after each handler (PEP 475)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if status != 0 and (plan.run_dir / "ABORTED").is_file():
        return 3
    return 128 - status if status < 0 else status


def launch(files: list[str] | str, overrides: list[str], topo: Topology, launcher: str | None = None,
           dry_run: bool = False) -> int:
    """Print the command and run it (``dry_run``: print only)."""
    plan = build(files, overrides, topo, launcher)
    print(shlex.join([f"{k}={v}" for k, v in plan.env.items()] + plan.command), flush=True)
    if dry_run:
        return 0
    if plan.hostfile is not None:
        write_hostfile(topo, plan.hostfile)
    sys.stderr.flush()
    return run(plan)
