# Sourced by slurm/train.sbatch and slurm/train-deepspeed.sbatch: what both need besides
# the launch line. Sets PY, RUN_DIR, NNODES, HEAD, PORT and BIGTRAIN_NPROC_PER_NODE, installs
# the preemption traps, and gives `run_and_wait` and `finish`.
#
# Preemption, step by step:
#   1. SLURM sends SIGUSR1 to the batch shell GRACE seconds before the time limit
#      (#SBATCH --signal=B:USR1@GRACE; or by hand: scancel --signal=USR1 --batch JOBID).
#      Only the batch shell gets it: torchrun's agent would die of a USR1 without telling
#      its workers, so the shell tells the trainer instead, by touching RUN_DIR/STOP.
#   2. At the next step boundary every rank agrees, saves a checkpoint, records "preempt"
#      in RUN_DIR/ledger.jsonl and exits 0 (bigtrain/signals.py).
#   3. The shell runs `scontrol requeue`: the same job id starts again, appends to the same
#      log (--open-mode=append), and resumes from the newest checkpoint (checkpoint.resume:
#      auto). A requeued job may start again once the credentials of its last run have
#      expired (AuthInfo=cred_expire in slurm.conf: 120 s by default).
# SIGTERM (scancel, the time limit, preemption) also checkpoints and stops, as fast as a
# step and a save allow before SLURM's KillWait runs out; the job is requeued only when it
# was the time limit (scancel means cancel, and PreemptMode=REQUEUE requeues by itself).
# Exit status 3 means the stability guard aborted the run (RUN_DIR/ABORTED): the job is
# never requeued after it, since a rerun would only meet the same bad state.

if [[ $# -lt 1 ]]; then
    echo "usage: sbatch slurm/train.sbatch CONFIG.yaml [MORE.yaml ...] [key=value ...]" >&2; exit 2
fi
PY=${BIGTRAIN_PYTHON:-python}

# The traps come first, so that a signal in the job's first seconds is not lost; the STOP
# file is written once RUN_DIR is known.
requeue=0 stop=0
ask_to_stop() { stop=1; if [[ -n ${RUN_DIR:-} ]]; then touch "$RUN_DIR/STOP"; fi; }
on_usr1() {
    echo "bigtrain-slurm: SIGUSR1 at $(date +%T): checkpoint, stop, requeue"
    requeue=1
    ask_to_stop
}
on_term() {
    echo "bigtrain-slurm: SIGTERM at $(date +%T): checkpoint and stop"
    ask_to_stop
    if scontrol show job "$SLURM_JOB_ID" 2>/dev/null | grep -q "Reason=TimeLimit"; then requeue=1; fi
}
trap on_usr1 USR1
trap on_term TERM

# The run directory, from the config files and overrides (layered as `bigtrain train` does);
# this also checks them before any node is asked to start a process (a bad config stops
# here, with status 2 and no requeue).
RUN_DIR=$("$PY" -c 'import sys; from bigtrain.config import config_from_args
print(config_from_args(sys.argv[1:]).run_dir)' "$@") || exit 2
mkdir -p "$RUN_DIR"
rm -f "$RUN_DIR/STOP"   # a STOP left by an earlier job must not stop this one at once...
if (( stop )); then touch "$RUN_DIR/STOP"; fi   # ... but one asked for by now must

# The allocation: nodes, the first node (rendezvous host), processes per node.
NNODES=${SLURM_NNODES:-1}
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
PORT=${BIGTRAIN_RDZV_PORT:-$((20000 + SLURM_JOB_ID % 20000))}   # per job: jobs may share a node
if [[ -z ${BIGTRAIN_NPROC_PER_NODE:-} ]]; then
    gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    BIGTRAIN_NPROC_PER_NODE=$(( gpus > 0 ? gpus : 1 ))
fi

echo "bigtrain-slurm: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $NNODES node(s) x" \
     "$BIGTRAIN_NPROC_PER_NODE process(es), head $HEAD:$PORT, run dir $RUN_DIR"

# Run "$@" in the background and wait for it; sets `status`. A trapped signal interrupts
# `wait`, so wait again until the trainer has saved its checkpoint and exited.
run_and_wait() {
    "$@" &
    local pid=$! rc
    status=""
    while [[ -z $status ]]; do
        wait "$pid"; rc=$?
        kill -0 "$pid" 2>/dev/null || status=$rc
    done
    echo "bigtrain-slurm: training exited with status $status"
}

# Requeue when asked to (never after an abort: status 3), then end the batch script with
# the trainer's status.
finish() {
    if (( requeue )) && [[ $status == 3 ]]; then
        echo "bigtrain-slurm: the run aborted (see $RUN_DIR/ABORTED); not requeueing"
    elif (( requeue )); then
        echo "bigtrain-slurm: requeueing job $SLURM_JOB_ID; it resumes from the newest checkpoint"
        scontrol requeue "$SLURM_JOB_ID"
    fi
    exit "$status"
}
