#!/usr/bin/env bash
# A one-host SLURM cluster, for the tests and for trying the sbatch scripts on a workstation.
#
#   slurm/local-cluster.sh start DIR    # write DIR/slurm.conf, start munged, slurmctld and slurmd,
#                                       # wait until the node is idle
#   export SLURM_CONF=DIR/slurm.conf    # sbatch, squeue, scancel, sinfo now talk to it
#   slurm/local-cluster.sh stop DIR     # cancel its jobs, stop the three daemons it started
#
# Everything it writes (config, munge key and socket, state, spool, logs, pid files) is under
# DIR, on ports picked at start, so it never touches a system SLURM or munge. It needs root
# (slurmd starts jobs as their owner) and Debian's slurmctld, slurmd, slurm-client and munge
# packages; scripts/ensure-slurm.sh installs them. Start and stop are bounded by timeouts.
set -euo pipefail

cmd=${1:-}; dir=${2:-}
if [[ -z $cmd || -z $dir ]]; then
    echo "usage: $0 start|stop DIR" >&2; exit 2
fi
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
export SLURM_CONF=$dir/slurm.conf
TIMEOUT=${BIGTRAIN_SLURM_START_TIMEOUT:-60}

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# Stop the daemons whose pid files are given, waiting up to 10 s before SIGKILL.
stop_pidfiles() {
    local pids=() pid
    for file in "$@"; do
        [[ -f $file ]] && pid=$(cat "$file") && kill "$pid" 2>/dev/null && pids+=("$pid")
    done
    for pid in "${pids[@]}"; do
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    done
}

write_config() {
    # The node as slurmd itself measures it (CPUs, sockets, cores, memory), renamed "localhost":
    # a node configured larger than the hardware would be drained as invalid.
    local hardware
    hardware=$(slurmd -C | head -n1 | sed -e 's/^NodeName=[^ ]*//')
    mkdir -p "$dir/state" "$dir/spool"
    cat > "$SLURM_CONF" <<EOF
# Written by slurm/local-cluster.sh: one node, one partition, no cgroups, no accounting.
ClusterName=bigtrain-local
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge.socket,cred_expire=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
SchedulerParameters=sched_interval=1
KillWait=30
NodeName=localhost NodeAddr=127.0.0.1$hardware State=UNKNOWN
PartitionName=local Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
    for tool in munged slurmctld slurmd sinfo; do
        command -v "$tool" >/dev/null || { echo "local-cluster: $tool not found (run scripts/ensure-slurm.sh)" >&2; exit 3; }
    done
    [[ $(id -u) == 0 ]] || { echo "local-cluster: needs root (slurmd starts jobs as their owner)" >&2; exit 3; }
    write_config
    # A fresh key for this cluster; munged insists that only its owner can read it.
    (umask 077; head -c 1024 /dev/urandom > "$dir/munge.key")
    munged --force --key-file="$dir/munge.key" --socket="$dir/munge.socket" --pid-file="$dir/munged.pid" \
           --seed-file="$dir/munged.seed" --log-file="$dir/munged.log"
    slurmctld -c -i
    slurmd -N localhost
    local state=""
    for _ in $(seq $((TIMEOUT * 2))); do
        state=$(timeout 5 sinfo -h -N -n localhost -o %T 2>/dev/null || true)
        if [[ $state == idle* ]]; then
            echo "local-cluster: up (SLURM_CONF=$SLURM_CONF)"; return 0
        fi
        sleep 0.5
    done
    echo "local-cluster: node not idle after ${TIMEOUT}s (state: ${state:-none}); see $dir/*.log" >&2
    stop
    exit 1
}

stop() {
    if [[ -f $dir/slurmctld.pid ]]; then
        timeout 10 scancel --full --quiet --partition=local 2>/dev/null || true
        for _ in $(seq 50); do
            [[ -z $(timeout 5 squeue -h -o %i 2>/dev/null) ]] && break
            sleep 0.2
        done
    fi
    stop_pidfiles "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munged.pid"
}

case $cmd in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop DIR" >&2; exit 2 ;;
esac
