#!/usr/bin/env bash
# Install what a job needs on a fresh Debian/Ubuntu machine; safe to run again (a second run installs nothing).
#
#   bash launch/install.sh            # .venv with the trainer (editable): all the CPU quickstart needs
#   bash launch/install.sh --ffcv     # ... plus FFCV, built from source against Debian's JPEG / OpenCV libraries
#                                     #     (only for dataset.loader=ffcv and `python -m data.prepare`)
#   bash launch/install.sh --test     # ... plus the test tools, and SLURM, munge and iproute2 for the cluster tests
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
apt_packages=()
for arg in "$@"; do
  case "$arg" in
    # the cluster tier runs real SLURM daemons and network namespaces (ip netns, nsenter from util-linux)
    --test) extras+=(test); apt_packages+=(slurm-wlm munge iproute2) ;;
    # FFCV compiles a C++ extension against these (slim images, e.g. a CUDA runtime base, have no compiler)
    --ffcv) extras+=(ffcv); apt_packages+=(pkg-config libturbojpeg0-dev libopencv-dev g++) ;;
    --system) use_venv=0 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option '$arg' (use --test, --ffcv, --system)" >&2; exit 2 ;;
  esac
done

# --- Debian packages (none for the plain trainer) ------------------------------------------------
missing=()
for pkg in ${apt_packages[@]+"${apt_packages[@]}"}; do
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
# A stamp of what was installed (the requirements in setup.cfg and the extras asked for): a second run with the
# same or fewer extras has nothing to do and says so without asking pip.
stamp_dir=$("$python_bin" -c 'import sys; print(sys.prefix)')
stamp="$stamp_dir/.simclr-install-stamp"
digest=$(sha256sum setup.cfg pyproject.toml | sha256sum | cut -c1-16)
wanted=("$digest" ${extras[@]+"${extras[@]}"})
if [ -f "$stamp" ] && [ "$(head -n 1 "$stamp")" = "$digest" ]; then
  have_all=1
  for extra in ${extras[@]+"${extras[@]}"}; do grep -qx "$extra" "$stamp" || have_all=0; done
  if [ "$have_all" -eq 1 ]; then
    echo "install.sh: already installed ($spec in $stamp_dir); nothing to do"
    exit 0
  fi
fi
# torch and torchvision are pinned exactly in setup.cfg (a looser range pulls several GB).
"$python_bin" -m pip install --quiet --disable-pip-version-check -e "$spec"
if [ -f "$stamp" ] && [ "$(head -n 1 "$stamp")" = "$digest" ]; then  # keep the extras installed earlier
  mapfile -t previous < <(tail -n +2 "$stamp")
  wanted+=(${previous[@]+"${previous[@]}"})
fi
printf '%s\n' "${wanted[@]}" | awk '!seen[$0]++' > "$stamp"
echo "install.sh: ready ($("$python_bin" -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)'))"
