# Worker image: Python with the pinned torch from PyPI. No CUDA base image is needed: PyPI's torch
# wheels carry the CUDA runtime (CUDA 13) as pip packages, and the host's driver comes in through the
# NVIDIA Container Toolkit (README "Self-hosting"). Build arguments, defaults being what compose builds:
#   BASE_IMAGE       any image with python3 (3.11+) and its venv module; Debian's python3 + python3-venv
#                    work too (tests/stack/test_compose_stack.py builds from a locally bootstrapped bookworm)
#   TORCH_INDEX_URL  where torch comes from (PyPI: the CUDA build; https://download.pytorch.org/whl/cpu
#                    for a CPU-only worker, a much smaller image)
#   TORCH            the torch and torchvision requirements
# The steps up to `USER rigl` are the API image's, word for word (the arguments are declared before
# FROM for that), so built with the same arguments the two images share those layers.
ARG BASE_IMAGE=python:3.11-slim
ARG TORCH_INDEX_URL=https://pypi.org/simple
ARG TORCH="torch==2.14.1 torchvision==0.29.1"
FROM ${BASE_IMAGE}
ARG TORCH_INDEX_URL
ARG TORCH

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv && pip install --index-url "$TORCH_INDEX_URL" $TORCH

WORKDIR /app
# The dependencies in a layer of their own, so a code or README change rebuilds only the last steps
# (an empty README.md stands in for the real one, which pyproject.toml names, until then).
COPY pyproject.toml ./
RUN touch README.md
RUN pip install ".[service,otel]"  # the library alone has no API, worker or job store; otel: traces (OTEL_*)
COPY README.md ./
COPY rigl_core ./rigl_core
COPY api ./api
COPY worker ./worker
COPY store ./store
COPY service_common ./service_common
RUN pip install --no-deps --force-reinstall . && rm -rf build

RUN useradd --create-home --uid 10001 rigl && mkdir -p /data /datasets && chown rigl /data
USER rigl

# Jobs on several nodes (training.nodes): every worker may supervise one on a Ray cluster, and the Ray nodes run
# this image too (docker-compose.yml profile ray, docker/kuberay-raycluster.yaml): the ray extra, installed after
# the steps shared with the API image.
USER root
RUN pip install ".[ray]" && rm -rf build
USER rigl

ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility
# Celery answers `inspect ping` while a job trains (prefork pool); docker-compose.yml's worker healthcheck is
# this, word for word. `uname -n` is the %h of the node name (podman's exec, which runs healthchecks, has no
# $HOSTNAME).
HEALTHCHECK --interval=30s --timeout=20s --retries=3 --start-period=2m \
  CMD celery -A worker.app inspect ping -d "rigl@$(uname -n)" --timeout 10 || exit 1
CMD ["rigl", "worker", "--name", "rigl@%h"]
