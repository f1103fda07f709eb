#!/usr/bin/env bash
# Start bigtrain on this node under DeepSpeed's launcher (for parallel.backend: deepspeed).
#
#   launcher/deepspeed.sh CONFIG.yaml [MORE.yaml ...] [key=value ...] [--dry-run]
#
# Later files win, overrides win over every file; the exit status is `bigtrain launch`'s
# (3: the run aborted, do not retry).
#
# One node: NPROC_PER_NODE processes (default: one per GPU, else 1); on a machine without
# GPUs DeepSpeed's CPU accelerator is selected (DS_ACCELERATOR=cpu).
# Several nodes: run it on every node, each with its own NODE_RANK; no ssh between nodes
# is needed (each node starts its own launcher), e.g.
#   NNODES=4 NODE_RANK=$SLURM_NODEID RDZV_ENDPOINT=$HEAD:29500 launcher/deepspeed.sh CONFIG.yaml
# PYTHON picks the interpreter that has bigtrain and deepspeed installed (default: python).
# It prints the exact deepspeed command, then runs it; the logic is in bigtrain/launch.py.
set -euo pipefail
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
NPROC_PER_NODE=${NPROC_PER_NODE:-$(( gpus > 0 ? gpus : 1 ))}
exec "${PYTHON:-python}" -m bigtrain launch --launcher deepspeed --nproc-per-node "$NPROC_PER_NODE" \
    --nnodes "${NNODES:-1}" ${NODE_RANK:+--node-rank "$NODE_RANK"} ${RDZV_ENDPOINT:+--rdzv-endpoint "$RDZV_ENDPOINT"} \
    "$@"
