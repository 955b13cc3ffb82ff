#!/usr/bin/env bash
# Runs the trainer in the container image on this machine's GPUs (build it first: docker build -t simclr-trainer .).
#
#   bash launch/docker_run.sh --config configs/stl10_r18.yaml     # reads ./datasets/stl10/train_unlabeled.beton
#   SIMCLR_DATA=/mnt/data bash launch/docker_run.sh --config configs/imagenet_r50_b8192_1node.yaml
#                                                                 # reads /mnt/data/imagenet/train.beton
#
# Arguments go to `torchrun ... -m trainer.main` in the container (working directory /workspace, the repo).
# Rerunning the same command resumes from the checkpoints in OUTPUT_DIR.
#
# Environment:
#   IMAGE           image to run (default simclr-trainer:latest)
#   SIMCLR_DATA     the host's data folder (default ./datasets when it exists), mounted read-only at
#                   /workspace/datasets, where the configs' datasets/<name>/... paths point inside the container
#                   (the same rule as outside it: data.sources.resolve_data_path)
#   OUTPUT_DIR      host directory mounted at /workspace/runs, where the configs' output_dir (runs/<name>)
#                   lands (default ./runs): checkpoints outlive the container. A config of your own placed
#                   there is --config runs/<file>.yaml inside.
#   GPUS            docker's --gpus value (default: all, or the devices in CUDA_VISIBLE_DEVICES when set);
#                   GPUS= (empty) runs on CPU
#   NPROC           processes (default: one per GPU the container sees; 1 on CPU)
#   DOCKER_USER     uid:gid in the container (default: yours, so the files in OUTPUT_DIR belong to you);
#                   DOCKER_USER= (empty) keeps the image's non-root user
#   STOP_TIMEOUT_S  seconds `docker stop` waits (after SIGTERM) for the final checkpoint (default 150)
#   SHUTDOWN_TIMEOUT_S, MAX_RESTARTS   as in launch/single_node.sh and launch/multi_node.sh
#   CONTAINER_NAME  optional --name, to `docker stop` it by name
#   MASTER_ADDR, NNODES [MASTER_PORT, NODE_RANK, RDZV_ID, RDZV_JOIN_TIMEOUT_S, NODE_LOST_TIMEOUT_S, SOCKET_IFNAME,
#                   LOCAL_ADDR]   several nodes: run this on every node, as with launch/multi_node.sh (see there);
#                   the container then uses the host's network
#   Passed into the container when set: NCCL_*, GLOO_*, TORCH_* (except TORCH_HOME, TORCH_EXTENSIONS_DIR),
#   TORCHELASTIC_*, PYTORCH_*, OMP_NUM_THREADS, CUDA_LAUNCH_BLOCKING, LOGLEVEL, PYTHONFAULTHANDLER.
set -euo pipefail

image="${IMAGE:-simclr-trainer:latest}"
launcher=docker_run.sh
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# --- mounts --------------------------------------------------------------------------------------------
# One data folder at /workspace/datasets: the configs' datasets/... paths are relative to the working directory
# (/workspace) when SIMCLR_DATA is unset, as it is in the container (a host path would mean nothing there).
mounts=()
if [ -n "${SIMCLR_DATA:-}" ]; then
  if [ ! -d "$SIMCLR_DATA" ]; then
    echo "docker_run.sh: SIMCLR_DATA=$SIMCLR_DATA is not a directory" >&2
    exit 2
  fi
  mounts+=(-v "$(cd "$SIMCLR_DATA" && pwd):/workspace/datasets:ro")
elif [ -d datasets ]; then
  mounts+=(-v "$PWD/datasets:/workspace/datasets:ro")
fi
output_dir="${OUTPUT_DIR:-runs}"
mkdir -p "$output_dir"  # created by docker instead, it would belong to root
mounts+=(-v "$(cd "$output_dir" && pwd):/workspace/runs")

# --- devices, user, environment ------------------------------------------------------------------------
if [ -n "${GPUS+set}" ]; then
  gpus="$GPUS"
elif [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
  gpus="\"device=$CUDA_VISIBLE_DEVICES\""
else
  gpus=all
fi
docker_args=(--rm --init --ipc=host --ulimit memlock=-1 --ulimit stack=67108864
  --stop-timeout "${STOP_TIMEOUT_S:-150}")
if [ -n "$gpus" ]; then
  docker_args+=(--gpus "$gpus")
  nproc_per_node="${NPROC:-gpu}"
else
  nproc_per_node="${NPROC:-1}"
fi
docker_user="${DOCKER_USER-$(id -u):$(id -g)}"
if [ -n "$docker_user" ]; then
  docker_args+=(--user "$docker_user" -e HOME=/tmp)  # a uid without a passwd entry would get HOME=/
fi
if [ -n "${CONTAINER_NAME:-}" ]; then
  docker_args+=(--name "$CONTAINER_NAME")
fi
while IFS= read -r name; do
  case "$name" in
    TORCH_HOME | TORCH_EXTENSIONS_DIR) ;;  # host paths
    NCCL_* | GLOO_* | TORCH_* | TORCHELASTIC_* | PYTORCH_* | OMP_NUM_THREADS | CUDA_LAUNCH_BLOCKING | LOGLEVEL | PYTHONFAULTHANDLER)
      docker_args+=(-e "$name") ;;
  esac
done < <(compgen -e)

# --- torchrun: one node (standalone) or several (c10d rendezvous on MASTER_ADDR) -------------------------
if [ -n "${MASTER_ADDR:-}" ]; then
  : "${NNODES:?set NNODES (the number of nodes) together with MASTER_ADDR}"
  docker_args+=(--network=host)  # NCCL and the rendezvous talk to the other nodes directly
  if [ -n "${SOCKET_IFNAME:-}" ]; then  # as in multi_node.sh: an explicit GLOO_/NCCL_SOCKET_IFNAME wins
    docker_args+=(-e "GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$SOCKET_IFNAME}"
      -e "NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-$SOCKET_IFNAME}")
  fi
  rdzv_conf="join_timeout=${RDZV_JOIN_TIMEOUT_S:-600}"
  if [ "${LOCAL_ADDR:-}" = "$MASTER_ADDR" ] || is_local_address "$MASTER_ADDR"; then
    rdzv_conf+=",is_host=true"  # the host network: this host's addresses are the container's
  fi
  # torchrun through trainer.distributed: a node lost for NODE_LOST_TIMEOUT_S ends the job naming it
  agent=(python -m trainer.distributed --rejoin-timeout="${NODE_LOST_TIMEOUT_S:-60}")
  rdzv_args=(--nnodes="$NNODES" --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}"
    --rdzv-id="${RDZV_ID:-simclr}" --rdzv-conf="$rdzv_conf")
  set_torchrun_signal_flags 3 120  # defaults as multi_node.sh: 3 restarts, 120 s to checkpoint
  if [ -n "${NODE_RANK:-}" ]; then
    rdzv_args+=(--node-rank="$NODE_RANK")
  fi
  if [ -n "${LOCAL_ADDR:-}" ]; then
    rdzv_args+=(--local-addr="$LOCAL_ADDR")
  fi
else
  agent=(python -m trainer.distributed)  # torchrun that ends on a Ctrl-C or stop signal with one line
  rdzv_args=(--standalone)
  set_torchrun_signal_flags 0 120  # defaults as single_node.sh: no restart, 120 s to checkpoint
fi

exec docker run "${docker_args[@]}" "${mounts[@]}" "$image" \
  "${agent[@]}" "${rdzv_args[@]}" "${torchrun_signal_flags[@]}" \
  --nproc_per_node="$nproc_per_node" -m trainer.main "$@"
