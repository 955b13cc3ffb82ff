#!/usr/bin/env bash
# Helpers sourced by the launchers (single_node.sh, multi_node.sh); not run on its own.
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

# The torchrun to use: $TORCHRUN, else the checkout's .venv (or $VENV_DIR), else torchrun on PATH.
find_torchrun() {
  local venv_torchrun="${VENV_DIR:-$repo_dir/.venv}/bin/torchrun"
  if [ -n "${TORCHRUN:-}" ]; then
    echo "$TORCHRUN"
  elif [ -x "$venv_torchrun" ]; then
    echo "$venv_torchrun"
  elif command -v torchrun >/dev/null 2>&1; then
    command -v torchrun
  else
    echo "${launcher:-launch}: torchrun not found: run 'bash launch/install.sh' or set TORCHRUN" >&2
    return 1
  fi
}
