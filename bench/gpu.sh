#!/usr/bin/env bash
# GPU readiness in one command, for a CUDA machine with PyTorch installed and no network:
#   bash bench/gpu.sh [--steps 30]
# bigtrain's pure-Python dependencies that such an image may lack (pydantic and its parts) can
# travel as wheels in ./.whl (see the device notes in docs/design.md); they are installed into
# /tmp/site, never over the machine's torch. Prints the JSON of bench/gpu.py; with $OUT set
# (the device tool's output folder) also writes it to $OUT/gpu.json.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import pydantic, yaml, tqdm" 2>/dev/null; then
  ls .whl/*.whl >/dev/null 2>&1 || { echo "bench/gpu.sh: pydantic/pyyaml/tqdm missing and no ./.whl to install them from" >&2; exit 2; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 bench/gpu.py --out "${OUT:-/tmp}/gpu.json" "$@"
