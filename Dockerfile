# syntax=docker/dockerfile:1.7
# One image for the control plane, the inference server and the trainer (they differ only in command).
#
#   docker build -t huvidpo:0.1.0-cpu .                                   # CPU (default)
#   docker build -t huvidpo:0.1.0-cuda --build-arg FLAVOR=cuda .          # CUDA (torch CUDA wheel)
#   build args: TORCH_VERSION, TORCH_INDEX_URL (another CUDA build), PYTHON_IMAGE, CUDA_IMAGE
#
# No model weights are baked in: base models and adapters come from the object store at run time.
# Runs as the non-root user 10001; every writable path (/tmp, caches, work dirs) is a mounted volume
# in deploy/, so the root filesystem can stay read-only.

ARG FLAVOR=cpu
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04

# ---------------------------------------------------------------------------------------- runtimes
# CPU: the official slim Python image.
FROM ${PYTHON_IMAGE} AS runtime-cpu
ENV HUVIDPO_PYTHON=/usr/local/bin/python3 \
    HUVIDPO_TORCH_INDEX=https://download.pytorch.org/whl/cpu

# CUDA: torch's CUDA wheels carry their own CUDA libraries; the base only has to match the driver
# (the NVIDIA container toolkit mounts it) and supply a Python of at least 3.11.
FROM ${CUDA_IMAGE} AS runtime-cuda
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
ENV HUVIDPO_PYTHON=/usr/bin/python3 \
    HUVIDPO_TORCH_INDEX=https://download.pytorch.org/whl/cu128

# The FLAVOR build argument picks one of the two stages above.
# hadolint ignore=DL3006
FROM runtime-${FLAVOR} AS runtime

# ---------------------------------------------------------------------------------------- builder
FROM runtime AS builder
ARG TORCH_VERSION=2.13.0
# Empty: the flavour's index (CPU wheels, or CUDA 12.8 wheels matching CUDA_IMAGE).
ARG TORCH_INDEX_URL=""
WORKDIR /src
RUN "${HUVIDPO_PYTHON}" -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from the index of this flavour; the project's own `torch>=` range then accepts it.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL:-${HUVIDPO_TORCH_INDEX}}" "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md* ./
COPY huvidpo ./huvidpo
COPY services ./services
COPY protos ./protos
# The library with the services' dependencies (the `server` extra). Spelt "./[server]": hadolint reads
# ".[server]" as an unpinned package name (DL3013), "./" as the local project it is.
RUN pip install --no-cache-dir "./[server]"

# ---------------------------------------------------------------------------------------- final
FROM runtime AS final
LABEL org.opencontainers.image.title="huvidpo" \
      org.opencontainers.image.description="HuViDPO control plane, inference server and trainer" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 huvidpo \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp huvidpo
COPY --from=builder /opt/venv /opt/venv
# Caches and HOME point into /tmp (an emptyDir in deploy/), never into the image.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    HF_HOME=/tmp/hf \
    HF_HUB_OFFLINE=1 \
    XDG_CACHE_HOME=/tmp/cache \
    MPLCONFIGDIR=/tmp/matplotlib \
    TORCH_HOME=/tmp/torch
WORKDIR /tmp
USER 10001:10001
EXPOSE 8080 50051 9090
# The control plane by default; deploy/ sets the command of the inference server and the trainer.
CMD ["python", "-m", "services.controlplane"]
