#!/usr/bin/env bash
# Several nodes started by hand (or by any scheduler): run this on EVERY node with the same variables; the
# nodes meet at a c10d rendezvous hosted by the torchrun on MASTER_ADDR.
#
#   node0$ MASTER_ADDR=node0 NNODES=2 bash launch/multi_node.sh --config configs/imagenet_r50_b8192.yaml
#   node1$ MASTER_ADDR=node0 NNODES=2 bash launch/multi_node.sh --config configs/imagenet_r50_b8192.yaml
#
# Arguments go to `python -m trainer.main` unchanged. output_dir must be on storage every node sees (rank 0
# writes the checkpoints; after a restart any node may need to read them).
#
# Environment:
#   MASTER_ADDR         host name or address of the rendezvous host, reachable from every node   [required]
#   NNODES              number of nodes, or MIN:MAX for an elastic range                          [required]
#   MASTER_PORT         rendezvous port on MASTER_ADDR (default 29500)
#   NODE_RANK           optional: this node's rank (c10d assigns ranks by itself; set it to pin the order)
#   NPROC               processes per node (default: the GPUs visible here, else 1)
#   RDZV_ID             id shared by the nodes of one job (default simclr); use a new one per job when
#                       several jobs share a rendezvous host and port
#   RDZV_JOIN_TIMEOUT_S seconds the first node waits for all the others to join (default 600)
#   MAX_RESTARTS        restarts of the worker group after a failure; each resumes from the newest checkpoint
#                       (default 3)
#   SHUTDOWN_TIMEOUT_S  seconds torchrun gives the workers to checkpoint after SIGTERM/SIGUSR1 (default 120)
#   OMP_NUM_THREADS     CPU threads per process (default 1)
#   TORCHRUN            the torchrun to run (default: the repo's .venv/bin/torchrun, else torchrun on PATH)
set -euo pipefail

repo_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# This checkout's trainer, whatever the working directory (relative paths in the arguments stay yours).
export PYTHONPATH="$repo_dir${PYTHONPATH:+:$PYTHONPATH}"
launcher=multi_node.sh
# shellcheck source=launch/common.sh
source "$repo_dir/launch/common.sh"

missing=()
[ -n "${MASTER_ADDR:-}" ] || missing+=("MASTER_ADDR (the rendezvous host, e.g. the first node: MASTER_ADDR=node0)")
[ -n "${NNODES:-}" ] || missing+=("NNODES (the number of nodes, e.g. NNODES=2, or MIN:MAX)")
if [ "${#missing[@]}" -gt 0 ]; then
  for item in "${missing[@]}"; do
    echo "multi_node.sh: set $item" >&2
  done
  echo "multi_node.sh: run the same command on every node, e.g." \
    "MASTER_ADDR=node0 NNODES=2 bash launch/multi_node.sh --config configs/imagenet_r50_b8192.yaml" >&2
  exit 2
fi
if ! [[ "$NNODES" =~ ^[1-9][0-9]*(:[1-9][0-9]*)?$ ]]; then
  echo "multi_node.sh: NNODES='$NNODES' must be a positive integer or MIN:MAX" >&2
  exit 2
fi

gpus=$(gpu_count)
nproc_per_node="${NPROC:-$((gpus > 0 ? gpus : 1))}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
torchrun_bin=$(find_torchrun)
node_rank_args=()
if [ -n "${NODE_RANK:-}" ]; then
  node_rank_args=(--node-rank="$NODE_RANK")
fi

exec "$torchrun_bin" \
  --nnodes="$NNODES" \
  ${node_rank_args[@]+"${node_rank_args[@]}"} \
  --nproc_per_node="$nproc_per_node" \
  --rdzv-backend=c10d \
  --rdzv-endpoint="${MASTER_ADDR}:${MASTER_PORT:-29500}" \
  --rdzv-id="${RDZV_ID:-simclr}" \
  --rdzv-conf="join_timeout=${RDZV_JOIN_TIMEOUT_S:-600}" \
  --max-restarts="${MAX_RESTARTS:-3}" \
  --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
  --shutdown-timeout="${SHUTDOWN_TIMEOUT_S:-120}" \
  -m trainer.main "$@"
