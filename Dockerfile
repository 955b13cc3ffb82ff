# SimCLR trainer on CUDA GPUs.
#   docker build -t simclr-trainer .
#   DATA_DIR=/data OUTPUT_DIR=$PWD/runs bash launch/docker_run.sh --config configs/stl10_r18.yaml
# or directly:
#   docker run --rm --gpus all --ipc=host -v /data:/data -v $PWD/runs:/workspace/runs simclr-trainer \
#     torchrun --standalone --nproc_per_node=gpu -m trainer.main --config configs/stl10_r18.yaml
#
# Base: CUDA 13.0 runtime, the CUDA line of the pinned torch==2.14.1 wheels (+cu130; the wheels bring their
# own cuDNN/NCCL, the image brings the driver-facing runtime). The install steps are launch/install.sh, the
# same script the README's commands and CI run.
FROM nvidia/cuda:13.0.1-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    VENV_DIR=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    OMP_NUM_THREADS=1

# Python itself; install.sh adds FFCV's libraries (pkg-config, libturbojpeg, OpenCV) and the package.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential git \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /workspace
COPY . /workspace
RUN bash launch/install.sh --ffcv \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 trainer \
    && mkdir -p /workspace/runs \
    && chown -R trainer:trainer /workspace

USER 1000:1000
CMD ["torchrun", "--standalone", "--nproc_per_node=gpu", "-m", "trainer.main", "--config", "configs/quickstart.yaml"]
