#!/usr/bin/env bash
# Runs the trainer in the container on this node's GPUs:
#   docker build -t simclr-trainer .
#   DATA_DIR=/data OUTPUT_DIR=$PWD/runs bash launch/docker_run.sh --config configs/stl10_r18.yaml
# Environment: IMAGE (default simclr-trainer:latest), DATA_DIR (mounted at /data), OUTPUT_DIR (mounted at
# /workspace/runs: checkpoints survive the container), NPROC (default: all GPUs); NCCL_* variables pass through.
set -euo pipefail

image="${IMAGE:-simclr-trainer:latest}"
data_dir="${DATA_DIR:-$PWD/data}"
output_dir="${OUTPUT_DIR:-$PWD/runs}"
mkdir -p "$output_dir"
env_args=()
while IFS='=' read -r name _; do
  env_args+=(-e "$name")
done < <(env | grep -E '^NCCL_' || true)

exec docker run --rm --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 \
  -v "$data_dir":/data -v "$output_dir":/workspace/runs \
  "${env_args[@]}" \
  "$image" \
  torchrun --standalone --nproc_per_node="${NPROC:-gpu}" -m trainer.main "$@"
