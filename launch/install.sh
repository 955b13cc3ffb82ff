#!/usr/bin/env bash
# Install everything the trainer needs on a fresh Debian/Ubuntu machine; safe to run again.
#
#   bash launch/install.sh            # system libraries + .venv with the trainer (editable)
#   bash launch/install.sh --test     # ... plus the test tools (pytest, shellcheck, hadolint)
#   bash launch/install.sh --ffcv     # ... plus FFCV (built from source against the system libraries)
#   bash launch/install.sh --system   # install into the current Python instead of .venv (containers)
#
# The Dockerfile runs this same script, so CI exercises the container's install steps.
set -euo pipefail

repo_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo_dir"

venv_dir="${VENV_DIR:-$repo_dir/.venv}"
python_bin="${PYTHON:-python3}"
use_venv=1
extras=()
for arg in "$@"; do
  case "$arg" in
    --test) extras+=(test) ;;
    --ffcv) extras+=(ffcv) ;;
    --system) use_venv=0 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option '$arg' (use --test, --ffcv, --system)" >&2; exit 2 ;;
  esac
done

# --- Debian packages FFCV builds against (JPEG decode, OpenCV resize) ------------------------
apt_packages=(pkg-config libturbojpeg0-dev libopencv-dev)
for arg in "$@"; do  # FFCV compiles a C++ extension: slim images (e.g. a CUDA runtime base) have no compiler
  if [ "$arg" = "--ffcv" ]; then apt_packages+=(g++); fi
done
missing=()
for pkg in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  sudo_cmd=()
  if [ "$(id -u)" -ne 0 ]; then sudo_cmd=(sudo); fi
  echo "install.sh: installing Debian packages: ${missing[*]}"
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# --- Python environment -------------------------------------------------------------------------
if [ "$use_venv" -eq 1 ]; then
  if [ ! -x "$venv_dir/bin/python" ]; then
    echo "install.sh: creating $venv_dir"
    "$python_bin" -m venv "$venv_dir"
  fi
  python_bin="$venv_dir/bin/python"
fi

spec="."
if [ "${#extras[@]}" -gt 0 ]; then
  spec=".[$(IFS=,; echo "${extras[*]}")]"
fi
# torch and torchvision are pinned exactly in setup.cfg (a looser range pulls several GB).
"$python_bin" -m pip install --quiet --disable-pip-version-check -e "$spec"
echo "install.sh: ready ($("$python_bin" -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)'))"
