#!/usr/bin/env bash
# The main job on the embedded default: installs, then pretrains SimCLR on scikit-learn's digits with
# 2 CPU processes and prints the held-out linear-probe / kNN accuracy next to a random-init backbone.
# Extra arguments are config overrides (e.g. epochs=5 output_dir=runs/short). Rerunning resumes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash launch/install.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec .venv/bin/torchrun --standalone --nproc_per_node="${NPROC:-2}" -m trainer.main \
  --config configs/quickstart.yaml "$@"
