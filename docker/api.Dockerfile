# API image: Python with the CPU build of the pinned torch (the API builds models on the meta device to
# validate jobs; it never trains). Build arguments, defaults being what compose builds:
#   BASE_IMAGE       any image with python3 (3.11+) and its venv module; Debian's python3 + python3-venv
#                    work too (tests/stack/test_compose_stack.py builds from a locally bootstrapped bookworm)
#   TORCH_INDEX_URL  where torch comes from: PyTorch's CPU wheels, so no CUDA libraries in this image
#   TORCH            the torch and torchvision requirements
# The steps up to `USER rigl` are the worker image's, word for word (the arguments are declared before
# FROM for that), so built with the same arguments the two images share those layers.
ARG BASE_IMAGE=python:3.11-slim
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
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

EXPOSE 8000
# Ready = answering and reaching its database (/readyz); docker-compose.yml's api healthcheck is this, word for word.
HEALTHCHECK --interval=15s --timeout=5s --retries=5 --start-period=1m \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4).status != 200)"
CMD ["rigl", "serve", "--no-worker", "--host", "0.0.0.0", "--port", "8000"]
