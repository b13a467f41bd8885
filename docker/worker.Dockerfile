# Worker image: CUDA runtime base with the pinned torch build from PyPI (CUDA 13 wheels).
FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install torch==2.14.1 torchvision==0.29.1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY rigl_core ./rigl_core
COPY api ./api
COPY worker ./worker
COPY store ./store
RUN pip install ".[service]"  # the library alone has no API, worker or job store

RUN useradd --create-home --uid 10001 rigl && mkdir -p /data /datasets && chown rigl /data
USER rigl
# Celery answers `inspect ping` while a job trains (prefork pool); see docker-compose.yml.
HEALTHCHECK --interval=30s --timeout=20s --retries=3 \
  CMD celery -A worker.app inspect ping -d "rigl@$HOSTNAME" --timeout 10 || exit 1
CMD ["rigl", "worker", "--name", "rigl@%h"]
