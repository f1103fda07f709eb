#!/usr/bin/env bash
# Install Debian's SLURM and munge when they are missing, for tests/test_slurm.py, which
# starts a one-host cluster of its own (slurm/local-cluster.sh). `make test` calls this.
#
# It never fails the build: where it cannot install (not root, no apt-get, no network),
# it says why, and the SLURM tests skip with that reason.
set -u
packages=(slurmctld slurmd slurm-client munge)
missing=0
for tool in slurmctld slurmd sbatch munged; do
    command -v "$tool" >/dev/null 2>&1 || missing=1
done
(( missing )) || exit 0

if [[ $(id -u) != 0 ]]; then
    echo "ensure-slurm: SLURM is not installed and we are not root; tests/test_slurm.py will skip"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-slurm: SLURM is not installed and there is no apt-get; tests/test_slurm.py will skip"
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
echo "ensure-slurm: installing ${packages[*]}"
# Try without `apt-get update` first: it is slow and usually not needed.
if ! apt-get install -y -q "${packages[@]}" >/tmp/ensure-slurm.log 2>&1; then
    apt-get update -q >>/tmp/ensure-slurm.log 2>&1
    apt-get install -y -q "${packages[@]}" >>/tmp/ensure-slurm.log 2>&1 \
        || echo "ensure-slurm: apt-get install failed (see /tmp/ensure-slurm.log); tests/test_slurm.py will skip"
fi
exit 0
