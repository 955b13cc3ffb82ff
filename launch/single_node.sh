#!/usr/bin/env bash
# One node, one process per GPU (or NPROC processes on CPU):
#   bash launch/single_node.sh --config configs/stl10_r18.yaml [dotted.key=value ...]
# Environment:
#   NPROC            processes (default: the number of GPUs nvidia-smi lists, else 1)
#   OMP_NUM_THREADS  CPU threads per process (default 1 with GPUs, else cores / NPROC)
#   TORCHRUN         the torchrun to use (default: torchrun on PATH, else .venv/bin/torchrun)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

gpus=0
if command -v nvidia-smi >/dev/null 2>&1; then
  gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi
nproc_per_node="${NPROC:-$(( gpus > 0 ? gpus : 1 ))}"
if [ "$gpus" -gt 0 ]; then
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
else
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / nproc_per_node > 0 ? $(nproc) / nproc_per_node : 1 ))}"
fi
torchrun_bin="${TORCHRUN:-$(command -v torchrun || echo .venv/bin/torchrun)}"

exec "$torchrun_bin" --standalone --nproc_per_node="$nproc_per_node" -m trainer.main "$@"
