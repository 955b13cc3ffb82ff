#!/usr/bin/env bash
# GPU benchmarks on one GPU in under 10 minutes: correctness of the CUDA paths first (the test suite's CUDA
# checks and a short bf16 training run), then throughput (ResNet-50 at 224, bf16, channels_last, compile,
# batch sweep with MFU, NT-Xent memory, LARS vs SGD, NCCL-free loader and augmentation numbers).
# Writes benchmarks/results/<gpu>-<date>/ (report.json, summary.md, plots).
#   bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python="${PYTHON:-.venv/bin/python}"
[ -x "$python" ] || python=python3
"$python" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print(torch.cuda.get_device_name(0))'
# a short real run on the GPU: SyncBN off (one device), bf16, channels_last, cached step mode
out=$(mktemp -d)
timeout 300 "$python" -m trainer.main --config configs/quickstart.yaml output_dir="$out/run" device=cuda amp=bf16 \
  dataset.input_shape="(32,32,3)" max_steps=20 log_every_n_steps=5 eval.final_probe=false
timeout 120 "$python" -m trainer.main --config configs/quickstart.yaml output_dir="$out/cached" device=cuda amp=bf16 \
  step_mode=cached max_steps=5 log_every_n_steps=5 eval.final_probe=false
timeout 420 "$python" -m benchmarks.run --device cuda --quick --only step,loss,optimizer,large_batch,loader
