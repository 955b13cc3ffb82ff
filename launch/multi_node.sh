#!/usr/bin/env bash
# Several nodes, started by hand (or by any scheduler): run this on every node with the same variables.
#   MASTER_ADDR=node0 NNODES=2 bash launch/multi_node.sh --config configs/imagenet_r50_b8192.yaml
# Environment:
#   MASTER_ADDR   host of the c10d rendezvous (any node reachable by all, usually the first)  [required]
#   NNODES        number of nodes, or MIN:MAX for an elastic range                             [required]
#   MASTER_PORT   rendezvous port (default 29500)
#   NPROC         processes per node (default: GPUs on this node)
#   RDZV_ID       job id shared by the nodes (default simclr)
#   MAX_RESTARTS  restarts of the worker group after a failure; each resumes from the latest checkpoint (default 3)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

: "${MASTER_ADDR:?set MASTER_ADDR to the rendezvous host (for example the first node)}"
: "${NNODES:?set NNODES to the number of nodes (or MIN:MAX)}"
gpus=0
if command -v nvidia-smi >/dev/null 2>&1; then
  gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
torchrun_bin="${TORCHRUN:-$(command -v torchrun || echo .venv/bin/torchrun)}"

exec "$torchrun_bin" \
  --nnodes="$NNODES" \
  --nproc_per_node="${NPROC:-$(( gpus > 0 ? gpus : 1 ))}" \
  --rdzv-backend=c10d \
  --rdzv-endpoint="${MASTER_ADDR}:${MASTER_PORT:-29500}" \
  --rdzv-id="${RDZV_ID:-simclr}" \
  --max-restarts="${MAX_RESTARTS:-3}" \
  -m trainer.main "$@"
