#!/usr/bin/env bash
# One node: one trainer process per GPU (or NPROC processes on CPU), torchrun's standalone rendezvous.
#
#   bash launch/single_node.sh --config configs/stl10_r18.yaml [dotted.key=value ...]
#
# Arguments go to `python -m trainer.main` unchanged; relative paths in them (the config, output_dir) are
# relative to the directory you run this from, as with torchrun itself. Rerunning the same command resumes
# from the newest checkpoint in output_dir. SIGTERM or SIGUSR1 to this process (it becomes torchrun, through
# `python -m trainer.distributed`): every rank finishes its step, rank 0 writes a checkpoint, the workers exit with
# 143; Ctrl-C or a closed terminal: the same, exit 130 (never restarted), one line instead of torchrun's traceback.
#
# Environment:
#   NPROC               processes on this node (default: the GPUs visible here, from CUDA_VISIBLE_DEVICES
#                       when it is set, else `nvidia-smi -L`; 1 without GPUs)
#   OMP_NUM_THREADS     CPU threads per process (default: 1 with GPUs, else cores / NPROC, at least 1)
#   MAX_RESTARTS        restarts of the whole worker group after a worker fails; each restart resumes from the
#                       newest checkpoint (default 0)
#   SHUTDOWN_TIMEOUT_S  seconds torchrun gives the workers to checkpoint after a stop signal before SIGKILL
#                       (default 120)
#   TORCHRUN            a torchrun to run instead, as it is (default: torchrun through `python -m
#                       trainer.distributed` with the repo's .venv python, else python3 on PATH; PYTHON to choose)
set -euo pipefail

repo_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# This checkout's trainer, whatever the working directory (relative paths in the arguments stay yours).
export PYTHONPATH="$repo_dir${PYTHONPATH:+:$PYTHONPATH}"
launcher=single_node.sh
# shellcheck source=launch/common.sh
source "$repo_dir/launch/common.sh"

gpus=$(gpu_count)
nproc_per_node="${NPROC:-$((gpus > 0 ? gpus : 1))}"
if ! [[ "$nproc_per_node" =~ ^[1-9][0-9]*$ ]]; then
  echo "single_node.sh: NPROC='$nproc_per_node' must be a positive integer" >&2
  exit 2
fi
if [ "$gpus" -gt 0 ]; then
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
else
  cores=$(nproc 2>/dev/null || echo 1)
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$((cores / nproc_per_node > 0 ? cores / nproc_per_node : 1))}"
fi
agent_command || exit 2
set_torchrun_signal_flags 0 120  # defaults: no restart, 120 s to checkpoint

exec "${agent_cmd[@]}" "${torchrun_signal_flags[@]}" \
  --standalone --nproc_per_node="$nproc_per_node" -m trainer.main "$@"
