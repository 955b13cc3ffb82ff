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
#   NODE_LOST_TIMEOUT_S seconds the nodes wait, after the workers stopped (a crash, a lost node), for every node of
#                       the last round to rejoin; then the job ends naming the missing node (default 60)
#   SOCKET_IFNAME       the network interface that connects the nodes (sets GLOO_SOCKET_IFNAME and
#                       NCCL_SOCKET_IFNAME): needed where the host name resolves to a loopback address (Debian's
#                       127.0.1.1), e.g. SOCKET_IFNAME=eth0
#   LOCAL_ADDR          this node's address as the other nodes reach it (torchrun --local-addr); set it where the
#                       host name does not resolve to that address. On the rendezvous node an address equal to
#                       MASTER_ADDR (or MASTER_ADDR given as one of this node's addresses) makes it host the
#                       rendezvous even when its host name resolves elsewhere
#   MAX_RESTARTS        restarts of the worker group after a failure; each resumes from the newest checkpoint
#                       (default 3)
#   SHUTDOWN_TIMEOUT_S  seconds torchrun gives the workers to checkpoint after SIGTERM/SIGUSR1 (default 120)
#   OMP_NUM_THREADS     CPU threads per process (default 1)
#   PYTHON              the Python that runs torchrun (default: the repo's .venv/bin/python, else python3)
#   TORCHRUN            a torchrun to run instead, as it is (without the NODE_LOST_TIMEOUT_S bound)
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
agent_command || exit 2
set_torchrun_signal_flags 3 120  # defaults: 3 restarts, 120 s to checkpoint
export_socket_ifname
extra_args=()
if [ -n "${NODE_RANK:-}" ]; then
  extra_args+=(--node-rank="$NODE_RANK")
fi
if [ -n "${LOCAL_ADDR:-}" ]; then
  extra_args+=(--local-addr="$LOCAL_ADDR")
fi
rdzv_conf="join_timeout=${RDZV_JOIN_TIMEOUT_S:-600}"
# torchrun decides whether this node hosts the rendezvous by resolving its host name: with MASTER_ADDR an IP and
# the host name on 127.0.1.1 no node would host it (RendezvousConnectionError). Say so explicitly.
if [ "${LOCAL_ADDR:-}" = "$MASTER_ADDR" ] || is_local_address "$MASTER_ADDR"; then
  rdzv_conf+=",is_host=true"
fi

exec "${agent_cmd[@]}" \
  --nnodes="$NNODES" \
  ${extra_args[@]+"${extra_args[@]}"} \
  --nproc_per_node="$nproc_per_node" \
  --rdzv-backend=c10d \
  --rdzv-endpoint="${MASTER_ADDR}:${MASTER_PORT:-29500}" \
  --rdzv-id="${RDZV_ID:-simclr}" \
  --rdzv-conf="$rdzv_conf" \
  "${torchrun_signal_flags[@]}" \
  -m trainer.main "$@"
