# API image: slim Python with the CPU build of the pinned torch (the API builds models on the meta
# device to validate jobs; it never trains).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.14.1 torchvision==0.29.1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY rigl_core ./rigl_core
COPY api ./api
COPY worker ./worker
COPY store ./store
RUN pip install ".[service]"  # the library alone has no API, worker or job store

RUN useradd --create-home --uid 10001 rigl && mkdir -p /data /datasets && chown rigl /data
USER rigl
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --retries=5 \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status != 200)"
CMD ["rigl", "serve", "--no-worker", "--host", "0.0.0.0", "--port", "8000"]
