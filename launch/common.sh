#!/usr/bin/env bash
# Helpers sourced by the launchers (single_node.sh, multi_node.sh, slurm.sbatch, docker_run.sh); not run on its own.
# The sourcing script sets repo_dir (the checkout) and launcher (its own name, for error messages).

# Visible GPUs: CUDA_VISIBLE_DEVICES wins (a scheduler may have narrowed it), then nvidia-smi.
gpu_count() {
  if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
    case "$CUDA_VISIBLE_DEVICES" in
      "" | -*) echo 0 ;;
      *) tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c . ;;
    esac
  elif command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
  else
    echo 0
  fi
}

# How torchrun answers a crash and a stop signal, the same for every launcher, in the array torchrun_signal_flags.
# $1: restarts of the worker group after a crash (MAX_RESTARTS wins; each restart resumes from the newest
# checkpoint); $2: seconds the workers get to checkpoint after a stop signal before SIGKILL (SHUTDOWN_TIMEOUT_S
# wins). SIGUSR1 (SLURM's notice before the time limit) is not among the signals torchrun forwards by default:
# without it in the list a USR1 would kill torchrun instead of reaching the workers, which checkpoint on it.
# shellcheck disable=SC2034,SC2054  # the array is for the sourcing script; the commas are torchrun's list
set_torchrun_signal_flags() {
  torchrun_signal_flags=(
    --max-restarts="${MAX_RESTARTS:-$1}"
    --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
    --shutdown-timeout="${SHUTDOWN_TIMEOUT_S:-$2}"
  )
}

# The command that starts this node's agent, in the array agent_cmd: torchrun through `python -m
# trainer.distributed`, which ends the job NODE_LOST_TIMEOUT_S (default 60) after the workers stopped when a node
# of the last round does not rejoin (plain torchrun waits its whole join timeout, then ends without naming it).
# $TORCHRUN, when set, runs as it is. Python: $PYTHON, else the checkout's .venv (or $VENV_DIR), else python3.
# shellcheck disable=SC2034  # agent_cmd is for the sourcing script
agent_command() {
  if [ -n "${TORCHRUN:-}" ]; then
    agent_cmd=("$TORCHRUN")
    return
  fi
  local python="${PYTHON:-${VENV_DIR:-$repo_dir/.venv}/bin/python}"
  if [ -z "${PYTHON:-}" ] && [ ! -x "$python" ]; then
    python=$(command -v python3 || true)
  fi
  if [ -z "$python" ] || ! [[ "${NODE_LOST_TIMEOUT_S:-60}" =~ ^[1-9][0-9]*$ ]]; then
    [ -n "$python" ] || echo "${launcher:-launch}: python not found: run 'bash launch/install.sh' or set PYTHON" >&2
    [ -z "$python" ] || echo "${launcher:-launch}: NODE_LOST_TIMEOUT_S='${NODE_LOST_TIMEOUT_S}' must be" \
      "a positive number of seconds" >&2
    return 2
  fi
  agent_cmd=("$python" -m trainer.distributed --rejoin-timeout="${NODE_LOST_TIMEOUT_S:-60}")
}

# SOCKET_IFNAME=eth0: the interface that connects the nodes, for gloo and NCCL alike (an explicit
# GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME wins). Needed where a node's host name resolves to a loopback address
# (Debian's hosts file: 127.0.1.1); the trainer stops at start-up with a message naming it otherwise.
export_socket_ifname() {
  if [ -n "${SOCKET_IFNAME:-}" ]; then
    export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-$SOCKET_IFNAME}"
    export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-$SOCKET_IFNAME}"
  fi
}

# Whether $1 is an address of one of this host's interfaces (ip from iproute2; no when it is missing).
is_local_address() {
  command -v ip >/dev/null 2>&1 || return 1
  ip -o addr show 2>/dev/null | awk '{sub(/\/.*/, "", $4); print $4}' | grep -qxF -- "$1"
}
