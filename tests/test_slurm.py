"""The sbatch scripts on a real SLURM: a one-host cluster (munged, slurmctld, slurmd) that
this module starts with slurm/local-cluster.sh and stops at the end.

`make test` installs Debian's SLURM packages when they are missing (scripts/ensure-slurm.sh);
where that is impossible the tests skip and say why.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from helpers import REPO, fit, read_jsonl, tiny_config, tiny_overrides, torchrun, train_losses

CLUSTER = REPO / "slurm" / "local-cluster.sh"
STEPS = 60


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """The environment (SLURM_CONF, ...) of a running one-host cluster."""
    missing = [t for t in ("munged", "slurmctld", "slurmd", "sbatch", "scontrol") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"SLURM is not installed (missing {', '.join(missing)}); `make test` installs it "
                    "as root with apt-get (scripts/ensure-slurm.sh)")
    if os.geteuid() != 0:
        pytest.skip("a local SLURM cluster needs root: slurmd starts jobs as their owner")
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SLURM_CONF": str(state / "slurm.conf"), "BIGTRAIN_PYTHON": sys.executable,
           "BIGTRAIN_NPROC_PER_NODE": "2", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    started = subprocess.run([str(CLUSTER), "start", str(state)], env=env, capture_output=True, text=True,
                             timeout=120)
    try:
        assert started.returncode == 0, f"local SLURM did not start:\n{started.stdout}{started.stderr}"
        yield env
    finally:
        subprocess.run([str(CLUSTER), "stop", str(state)], env=env, capture_output=True, timeout=120)


def sbatch(env: dict, script: str, log: Path, args: list[str], options: list[str] = ()) -> str:
    cpus = min(2, len(os.sched_getaffinity(0)))  # one per rank where there are two
    out = subprocess.run(["sbatch", "--parsable", f"--cpus-per-task={cpus}", f"--output={log}", *options,
                          script, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def job(env: dict, job_id: str) -> dict[str, str]:
    """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...)."""
    out = subprocess.run(["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True,
                         timeout=30).stdout
    return dict(f.split("=", 1) for f in out.split() if "=" in f)


def wait_until(what: str, done, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            text = log.read_text() if log.exists() else "(no log)"
            raise AssertionError(f"timed out waiting for {what}; job log:\n{text[-4000:]}")
        time.sleep(0.2)


def finished(env: dict, job_id: str) -> bool:
    return job(env, job_id).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")


def tiny(tmp_path: Path, data: str, run_dir: Path, steps: int) -> list[str]:
    config = tmp_path / "tiny.yaml"
    config.write_text("parallel: {backend: none}\n")
    return [str(config), *tiny_overrides(data, run_dir, schedule__max_steps=steps)]


@pytest.mark.slow
def test_preempted_job_checkpoints_requeues_resumes_and_matches_uninterrupted(slurm, prose_bytes, tmp_path):
    """train.sbatch, 2 ranks: SIGUSR1 to the batch shell mid-run -> checkpoint, "preempt",
    `scontrol requeue` -> the same job resumes from the checkpoint and trains what an
    uninterrupted 2-rank run trains, to the last step."""
    run, log, reference = tmp_path / "run", tmp_path / "job.log", tmp_path / "reference"
    with ThreadPoolExecutor(1) as pool:  # the uninterrupted run goes alongside, to save wall time
        uninterrupted = pool.submit(torchrun, 2, ["train", *tiny(tmp_path, prose_bytes, reference, STEPS)])
        job_id = sbatch(slurm, "slurm/train.sbatch", log, tiny(tmp_path, prose_bytes, run, STEPS))
        preempt_requeue_resume(slurm, job_id, run, log)
        result = uninterrupted.result()
    assert result.returncode == 0, result.stderr
    losses = train_losses(run)
    assert [s for s, _ in losses] == list(range(1, STEPS + 1)), "every step trained exactly once"
    assert losses == train_losses(reference)


def preempt_requeue_resume(slurm: dict, job_id: str, run: Path, log: Path) -> None:
    """Signal the batch shell once training is under way; check the job requeued, resumed
    from its checkpoint and completed."""
    def training() -> bool:
        if any(r.get("step", 0) >= 3 for r in read_jsonl(run / "metrics.jsonl")):
            return True
        assert not finished(slurm, job_id), log.read_text()
        return False
    wait_until("training to start", training, log)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=slurm, check=True, timeout=30)

    # A requeued job waits out the credential lifetime (cred_expire: 10 s in local-cluster.sh).
    wait_until("the requeued job to finish", lambda: finished(slurm, job_id), log, timeout=180)

    text = log.read_text()
    info = job(slurm, job_id)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text
    assert "requeueing job" in text and "restart 1" in text, text
    stops = [(e["event"], e["step"]) for e in read_jsonl(run / "ledger.jsonl") if e["event"] in ("preempt", "resume")]
    assert len(stops) == 2 and stops[0][0] == "preempt" and stops[1] == ("resume", stops[0][1]), stops
    assert 3 <= stops[0][1] < STEPS, "stopped mid-run"
    assert (run / "checkpoints" / f"step-{STEPS:08d}").is_dir()


@pytest.mark.slow
def test_deepspeed_sbatch_runs_to_completion(slurm, prose_bytes, tmp_path):
    """train-deepspeed.sbatch: an srun-started DeepSpeed launcher per node (--no_ssh), 2 ranks."""
    if importlib.util.find_spec("bigtrain.parallel.deepspeed") is None:
        pytest.skip("the DeepSpeed backend (bigtrain/parallel/deepspeed.py) is not in this tree yet")
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (pip install -e '.[deepspeed]')")
    run, log = tmp_path / "run", tmp_path / "job.log"
    job_id = sbatch(slurm, "slurm/train-deepspeed.sbatch", log, tiny(tmp_path, prose_bytes, run, 6))
    wait_until("the DeepSpeed job to finish", lambda: finished(slurm, job_id), log, timeout=240)
    info = job(slurm, job_id)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log.read_text()
    assert [s for s, _ in train_losses(run)] == list(range(1, 7))
    assert (run / "checkpoints" / f"step-{6:08d}").is_dir()


@pytest.mark.slow
def test_array_prepare_writes_what_one_machine_writes(slurm, docs_text, tmp_path):
    """prepare.sbatch as a 3-task array (a slice of the files each) and the merge job its first task
    submits: the prepared dir is byte for byte a one-machine prepare of the same files, and a run
    on it trains the same losses."""
    import zstandard

    from bigtrain.cli import main
    src = tmp_path / "src"
    src.mkdir()
    paragraphs = docs_text.split("\n\n")
    for i in range(5):  # files of unequal size, so that the slices are too
        rows = paragraphs[i * 700:(i + 1) * 700 + i * 300]
        data = "".join(json.dumps({"text": t}) + "\n" for t in rows).encode()
        (src / f"{i}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    args = ["--source", str(src / "*.jsonl.zst"), "--tokenizer", "bytes", "--val-fraction", "0.02",
            "--shard-tokens", "40000"]
    env = {**slurm, "BIGTRAIN_MERGE_OUTPUT": str(tmp_path / "merge.log")}
    first = tmp_path / "slice-0.log"
    sbatch(env, "slurm/prepare.sbatch", tmp_path / "slice-%a.log", [*args, "--out", str(tmp_path / "array")],
           options=["--array=0-2", "--cpus-per-task=1"])
    assert main(["prepare", *args, "--out", str(tmp_path / "one"), "--workers", "1"]) == 0  # meanwhile

    def submitted() -> bool:
        return first.exists() and "merge job" in first.read_text()
    wait_until("the first task to submit the merge", submitted, first)
    merge = re.search(r"merge job (\d+)", first.read_text()).group(1)
    wait_until("the merge job to finish", lambda: finished(slurm, merge), tmp_path / "merge.log", timeout=180)
    logs = "".join(p.read_text() for p in sorted(tmp_path.glob("*.log")))
    info = job(slurm, merge)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", logs
    one, array = tmp_path / "one", tmp_path / "array"
    assert _hashes(array) == _hashes(one) and len(_hashes(one)) > 4, logs
    assert not (tmp_path / "array.parts").exists()
    losses = []
    for data in (one, array):
        fit(tiny_config(str(data), tmp_path / f"run-{data.name}", schedule__max_steps=4))
        losses.append(train_losses(tmp_path / f"run-{data.name}"))
    assert losses[0] == losses[1] and len(losses[0]) == 4


def _hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("requeue, status, requeued", [(1, 0, True), (1, 3, False), (0, 0, False), (0, 1, False)])
def test_finish_requeues_when_asked_but_never_after_an_abort(tmp_path, requeue, status, requeued):
    """slurm/common.sh's `finish`, run by bash as the sbatch scripts run it, with `scontrol` a
    shell function that records the call: exit status 3 (the run aborted) is never requeued."""
    common = (REPO / "slurm" / "common.sh").read_text()
    finish = common[common.index("finish() {"):]
    script = (f'scontrol() {{ echo "scontrol $*" >> {tmp_path}/calls; }}\n{finish}\n'
              f'SLURM_JOB_ID=42 RUN_DIR={tmp_path} requeue={requeue} status={status}\nfinish\n')
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30)
    assert out.returncode == status, out.stderr
    calls = (tmp_path / "calls").read_text() if (tmp_path / "calls").exists() else ""
    assert calls == ("scontrol requeue 42\n" if requeued else "")
