#!/usr/bin/env bash
# The main job on the embedded default: installs what training needs, pretrains SimCLR on scikit-learn's digits
# (configs/quickstart.yaml: a small ResNet, about 3 minutes on a slow 2-core CPU), then prints the seed's
# results table: held-out linear-probe / kNN accuracy of the learned backbone, the random-init backbone and PCA.
# Extra arguments are config overrides (e.g. epochs=5 output_dir=runs/short). Ctrl-C stops after the current step
# with a checkpoint; rerunning resumes.
# Layout: one process with a thread per core (faster than a process per core for this small network on 2 cores:
# benchmarks/results/*-quickstart/quickstart.md). NPROC=2 runs the distributed path instead (torchrun, gloo,
# one thread per process): the same training, the global batch split over the processes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash launch/install.sh
output_dir=runs/quickstart
for arg in "$@"; do
  case "$arg" in output_dir=*) output_dir="${arg#output_dir=}" ;; esac
done
NPROC="${NPROC:-1}"
if [ "$NPROC" -eq 1 ]; then
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
  .venv/bin/python -m trainer.main --config configs/quickstart.yaml eval.final_probe=false "$@"
else
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  .venv/bin/python -m trainer.distributed --standalone --nproc_per_node="$NPROC" -m trainer.main \
    --config configs/quickstart.yaml eval.final_probe=false "$@"
fi
# the table, with the PCA and raw-pixel baselines (eval.md in the run folder); the run's own final probe, which would
# compute the same SimCLR and random-init rows, is off above
.venv/bin/python -m trainer.eval --checkpoint "$output_dir" --dataset digits --device cpu
