# syntax=docker/dockerfile:1.7
# One image for the control plane, the inference server and the trainer (they differ only in command).
#
#   docker build -t huvidpo:0.1.0-cpu .                                   # CPU (default)
#   docker build -t huvidpo:0.1.0-cuda --build-arg FLAVOR=cuda .          # CUDA 13.0 (NVIDIA driver >= 580)
#   docker build -t huvidpo:0.1.0-cuda126 --build-arg FLAVOR=cuda126 .    # CUDA 12.6, for older drivers:
#       first `make lock CU126=1` (writes requirements/lock-cuda126.txt from PyTorch's cu126 index)
#   build args: PYTHON_IMAGE, LOCK (another lock file under requirements/)
#
# Every flavour runs the same Python (PYTHON_IMAGE, 3.11 like the tests) and installs a hashed lock
# (requirements/lock-<flavour>.txt, `make lock`): pip refuses any file whose hash is not in it.
# The dependencies are one layer and the project another (`--no-deps`), so a code change reuses the
# dependency layer. tests/unit/test_image_lock.py keeps each flavour's CUDA version, its lock's
# torch build and the one Python version in agreement.
#
# No model weights are baked in: base models and adapters come from the object store at run time.
# Runs as the non-root user 10001; every writable path (/tmp, caches, work dirs) is a mounted volume
# in deploy/, so the root filesystem can stay read-only.

ARG FLAVOR=cpu
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# ---------------------------------------------------------------------------------------- runtimes
# CPU: torch's CPU build from PyTorch's CPU index.
FROM ${PYTHON_IMAGE} AS runtime-cpu
ENV HUVIDPO_LOCK=requirements/lock-cpu.txt \
    HUVIDPO_TORCH_INDEX=https://download.pytorch.org/whl/cpu

# CUDA on the same Python image, not on nvidia/cuda: torch's CUDA wheels bring the whole CUDA user
# space as pip packages (PyPI's torch 2.13.0 is the CUDA 13.0 build: cuda-toolkit 13.0.3 and
# nvidia-*-cu13 in the lock), and the NVIDIA container toolkit mounts the driver (libcuda, nvidia-smi)
# at start. What nvidia/cuda's base image adds for the toolkit is these variables: NVIDIA_REQUIRE_CUDA
# makes the toolkit refuse to start the container on a driver older than the wheel's CUDA, with a
# message naming both, instead of torch quietly finding no GPU. NVIDIA_VISIBLE_DEVICES is left to the
# device plugin (or `docker run --gpus`): set in the image, it would show every GPU to a pod that
# asked for none. /usr/local/nvidia is where some clusters (GKE) mount the driver.
FROM ${PYTHON_IMAGE} AS runtime-cuda
ENV HUVIDPO_LOCK=requirements/lock-cuda.txt \
    HUVIDPO_TORCH_INDEX="" \
    NVIDIA_REQUIRE_CUDA="cuda>=13.0" \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    LD_LIBRARY_PATH=/usr/local/nvidia/lib:/usr/local/nvidia/lib64 \
    PATH=/usr/local/nvidia/bin:$PATH

# CUDA 12.6 (PyTorch's cu126 index, torch 2.13.0+cu126): the fallback for drivers older than CUDA 13's
# (580). A 12.x build runs on any 12.x driver, 525 or newer (CUDA's minor-version compatibility), so
# it requires 12.0, not 12.6.
FROM ${PYTHON_IMAGE} AS runtime-cuda126
ENV HUVIDPO_LOCK=requirements/lock-cuda126.txt \
    HUVIDPO_TORCH_INDEX=https://download.pytorch.org/whl/cu126 \
    NVIDIA_REQUIRE_CUDA="cuda>=12.0" \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    LD_LIBRARY_PATH=/usr/local/nvidia/lib:/usr/local/nvidia/lib64 \
    PATH=/usr/local/nvidia/bin:$PATH

# The FLAVOR build argument picks one of the stages above.
# hadolint ignore=DL3006
FROM runtime-${FLAVOR} AS runtime

# ---------------------------------------------------------------------------------------- builder
FROM runtime AS builder
# Empty: the flavour's lock.
ARG LOCK=""
WORKDIR /src
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# The dependencies, every one pinned and hashed (torch's CPU or cu126 build from PyTorch's index, the
# rest from PyPI; --require-hashes also stops an index from substituting a package).
COPY requirements ./requirements
RUN pip install --no-cache-dir --require-hashes \
        ${HUVIDPO_TORCH_INDEX:+--extra-index-url "${HUVIDPO_TORCH_INDEX}"} -r "${LOCK:-${HUVIDPO_LOCK}}"
COPY pyproject.toml README.md* ./
COPY huvidpo ./huvidpo
COPY services ./services
COPY protos ./protos
# The project alone (the lock holds its dependencies; setuptools comes with it, so no build isolation
# and nothing unpinned is downloaded), then pip check: a lock that no longer satisfies pyproject.toml
# fails the build here.
RUN pip install --no-cache-dir --no-deps --no-build-isolation ./ && pip check

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
