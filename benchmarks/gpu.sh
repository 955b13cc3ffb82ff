#!/usr/bin/env bash
# The GPU acceptance run on one GPU, a verdict within 8 minutes: the CUDA-marked tests, every step mode x bf16/fp16
# x compile, resume, planned vs measured memory, host syncs per step, ResNet-50 views/s and MFU, loader ->
# device augmentation -> step end to end, global BN vs SyncBatchNorm. Exits non-zero on any failure.
# Writes benchmarks/results/<gpu>-<date>/ (report.json, summary.md; format in benchmarks/README.md).
#   bash benchmarks/gpu.sh [--dry-run] [--out DIR] [--beton FILE]
#   --dry-run: the same code on the CPU at tiny sizes (checks the script, not the GPU; no GPU needed)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python="${PYTHON:-.venv/bin/python}"
[ -x "$python" ] || python=python3
limit=480  # the verdict within 8 minutes; a dry run on a busy CPU may take longer
for arg in "$@"; do [ "$arg" != --dry-run ] || limit=1500; done
exec timeout "$limit" "$python" -m benchmarks.gpu_check "$@"
