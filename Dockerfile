# SimCLR trainer on CUDA GPUs.
#
#   docker build -t simclr-trainer . && bash launch/docker_run.sh --config configs/stl10_r18.yaml
# (docker_run.sh mounts the one data folder, $SIMCLR_DATA or ./datasets, read-only at /workspace/datasets, where
# the configs' datasets/<name>/... paths point, and ./runs at /workspace/runs; the data are never in the image.)
# or by hand (what docker_run.sh runs, less the environment pass-through and torchrun's signal flags):
#   docker run --rm --init --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 \
#     -v "$PWD/datasets:/workspace/datasets:ro" -v "$PWD/runs:/workspace/runs" simclr-trainer \
#     torchrun --standalone --nproc_per_node=gpu -m trainer.main --config configs/stl10_r18.yaml
# Without arguments the container runs the CPU/GPU quickstart (scikit-learn's digits, no data needed).
#
# Base image: the official PyTorch image of the pinned torch, so the install below keeps the image's torch and
# torchvision instead of downloading a second copy. Its tags read <torch>-cuda<CUDA>-cudnn<major>-runtime:
# the first part must equal the torch==X.Y.Z pin in setup.cfg (checked below), the CUDA part is the CUDA line
# of that torch release's default wheels (torch 2.14.1 wheels are +cu130: CUDA 13.0, cuDNN 9). After a pin
# change, pass the new tag with --build-arg BASE_IMAGE=pytorch/pytorch:<torch>-cuda<CUDA>-cudnn9-runtime.
# The host needs an NVIDIA driver for CUDA 13 and the NVIDIA container toolkit (for --gpus).
# The image's Python is conda's (not marked externally managed), so install.sh --system can pip-install into it; on a bare
# nvidia/cuda Ubuntu 24.04 base the system Python would need PIP_BREAK_SYSTEM_PACKAGES=1 and a second torch.
ARG BASE_IMAGE=pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    OMP_NUM_THREADS=1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /workspace

# A C++ compiler for FFCV's extension (the runtime image has none); install.sh adds the libraries it links.
# Versions come from the base image's Ubuntu release; exact Debian pins would break at every point release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*

# Dependencies first, from the packaging files and the package roots only, so that editing the code does not
# rebuild FFCV. The install is the shared script the README runs (--system: this image's Python, no venv).
COPY setup.cfg pyproject.toml README.md ./
COPY launch/install.sh launch/install.sh
COPY trainer/__init__.py trainer/__init__.py
COPY data/__init__.py data/__init__.py
RUN python -c "import re, torch; pin = re.search(r'torch==([0-9.]+)', open('setup.cfg').read()).group(1); \
have = torch.__version__.split('+')[0]; \
assert have == pin, f'base image has torch {have}, setup.cfg pins torch=={pin}: build with --build-arg BASE_IMAGE=pytorch/pytorch:{pin}-cuda<CUDA>-cudnn9-runtime'" \
    && bash launch/install.sh --system --ffcv \
    && rm -rf /var/lib/apt/lists/* \
    && python -c "import cv2, ffcv, torchvision"

COPY . .
# A numeric, non-root user (10001: clear of the base image's uid 1000) that orchestrators can verify.
RUN useradd --create-home --shell /bin/bash --uid 10001 --user-group trainer \
    && mkdir -p runs \
    && chown trainer:trainer runs \
    && python -c "import trainer.main, data.augment"
USER 10001:10001

# Any command line replaces this one, e.g. `torchrun --standalone --nproc_per_node=gpu -m trainer.main --config ...`.
CMD ["bash", "launch/single_node.sh", "--config", "configs/quickstart.yaml"]
